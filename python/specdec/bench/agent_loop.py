"""``specdec bench --scenario agent-loop``: a replayed multi-turn code-editing conversation (data/agent_loop.json).
Each request re-sends the conversation so far, the model's earlier answers included, and each answer shows the
whole file again, so most of it repeats earlier text.

Per turn, every method decodes the same conversation (target-only, suffix drafting, the draft model and the
hybrid of the two), in an order that rotates from turn to turn; the greedy answer, identical across methods (checked), joins the
conversation for the next turn. Decode tokens/s per method is summed over the turns (tokens ÷ decode time). The
prefix cache stays on, as in an agent's real loop: it shortens TTFT, not the decode rate compared here.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from specdec.bench.environment import identical_footer, method_table, scenario_config, scenario_heading
from specdec.bench.options import BenchOptions
from specdec.bench.runners import RunCounter, pooled_by_method, rotating_runs, scenario_report
from specdec.types import GenerationRequest, Method, SpeculationParams

DATA = Path(__file__).parent / "data" / "agent_loop.json"


def run_agent_loop(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None,
                   data: dict | None = None) -> dict:  # fmt: skip
    """The scenario on ``engine``; ``data``: {"system", "turns"} (default: data/agent_loop.json)."""
    data = data or json.loads(DATA.read_text(encoding="utf-8"))
    methods = [m.value for m in [Method.NONE, Method.SUFFIX] + ([Method.DRAFT, Method.AUTO] if engine.draft is not None else [])]
    messages = [{"role": "system", "content": data["system"]}]
    turns, t_start, load_start = [], time.time(), os.getloadavg()
    counter = RunCounter(progress, len(data["turns"]) * len(methods))
    for t, user in enumerate(data["turns"]):
        messages.append({"role": "user", "content": user})
        ids = engine.encode_chat(messages) if getattr(engine.tokenizer, "chat_template", None) else \
            engine.encode("\n\n".join(m["content"] for m in messages))  # fmt: skip

        def request_for(name: str, ids=ids, t=t) -> GenerationRequest:
            return GenerationRequest(prompt_ids=ids, max_new_tokens=options.max_new_tokens,
                                     speculation=SpeculationParams(method=Method(name)), request_id=f"turn{t}-{name}")  # fmt: skip

        turns.append({"prompt_tokens": len(ids), **rotating_runs(engine, methods, t, request_for, counter, f"turn {t}")})
        messages.append({"role": "assistant", "content": turns[-1]["runs"][Method.NONE.value]["text"]})
    return scenario_report("agent-loop", scenario_config(engine, options.max_new_tokens, t_start, load_start, turns=len(turns)),
                           pooled_by_method({m: [tr["runs"][m] for tr in turns] for m in methods}), "turns", turns)  # fmt: skip


def agent_loop_to_markdown(report: dict) -> str:
    c, s = report["config"], report["summary"]
    what = f"{c['turns']} turns of a code-editing conversation, up to {c['max_new_tokens']} new tokens a turn"
    return "\n".join(scenario_heading("agent-loop", c, what) + [""] + method_table(s) + identical_footer(report, "turns")) + "\n"
