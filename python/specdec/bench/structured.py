"""``specdec bench --scenario json-schema``: structured output under speculation (data/json_schema.json).

Ten requests ask for JSON that fits a schema (extraction, classification, a tool call, ...), each with its schema as
the response format. Every method decodes each request greedily: target-only, the draft model, the draft model with
jump-forward off, and the hybrid; the order rotates from request to request. The report gives decode tokens/s per
method (tokens ÷ decode time over all requests), the time spent in the grammar's masks as a share of the decode time,
the tokens verified by jump-forward, whether every output parses and validates (jsonschema), and whether the outputs
are identical across methods. The prefix cache is paused: every method meets each prompt cold.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import jsonschema

from specdec.bench.environment import identical_footer, scenario_config, scenario_heading
from specdec.bench.options import BenchOptions
from specdec.bench.runners import RunCounter, pooled_by_method, rotating_runs, scenario_report
from specdec.types import GenerationRequest, Method, ResponseFormat, SpeculationParams

DATA = Path(__file__).parent / "data" / "json_schema.json"
NO_JUMP = "draft-no-jump-forward"


def run_structured(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None,
                   data: dict | None = None) -> dict:  # fmt: skip
    """The scenario on ``engine``; ``data``: {"system", "requests": [{"prompt", "schema"}]} (default: the file)."""
    data = data or json.loads(DATA.read_text(encoding="utf-8"))
    methods = [Method.NONE.value] + ([Method.DRAFT.value, NO_JUMP, Method.AUTO.value] if engine.draft is not None else
                                     [Method.SUFFIX.value])  # fmt: skip
    rows, t_start, load_start = [], time.time(), os.getloadavg()
    counter = RunCounter(progress, len(data["requests"]) * len(methods))
    config = engine.config
    try:
        with engine.prefix_cache.paused():
            for r, item in enumerate(data["requests"]):
                messages = [{"role": "system", "content": data["system"]}, {"role": "user", "content": item["prompt"]}]
                ids = engine.encode_chat(messages) if getattr(engine.tokenizer, "chat_template", None) else \
                    engine.encode("\n\n".join(m["content"] for m in messages))  # fmt: skip
                fmt = ResponseFormat("json_schema", json.dumps(item["schema"]))

                def request_for(name: str, ids=ids, fmt=fmt, r=r) -> GenerationRequest:
                    engine.config = dataclasses.replace(config, jump_forward=name != NO_JUMP)  # for this run alone
                    method = Method.DRAFT if name == NO_JUMP else Method(name)
                    return GenerationRequest(prompt_ids=ids, max_new_tokens=options.max_new_tokens, response_format=fmt,
                                             speculation=SpeculationParams(method=method), request_id=f"r{r}-{name}")  # fmt: skip

                row = {"prompt_tokens": len(ids), **rotating_runs(engine, methods, r, request_for, counter, f"request {r}")}
                for run in row["runs"].values():
                    run["valid"] = _valid(run["text"], item["schema"])
                rows.append(row)
    finally:
        engine.config = config
    by_method = {name: [row["runs"][name] for row in rows] for name in methods}
    summary = pooled_by_method(by_method)
    for name, runs in by_method.items():
        summary[name].update(forced=sum(x["forced"] for x in runs), valid=sum(x["valid"] for x in runs),
                             grammar_share=sum(x["grammar_s"] for x in runs) / sum(x["wall_s"] for x in runs))  # fmt: skip
    return scenario_report("json-schema", scenario_config(engine, options.max_new_tokens, t_start, load_start, requests=len(rows)),
                           summary, "requests", rows)  # fmt: skip


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (json.JSONDecodeError, jsonschema.ValidationError):
        return False
    return True


def structured_to_markdown(report: dict) -> str:
    c, s = report["config"], report["summary"]
    what = f"{c['requests']} JSON-schema requests, greedy, up to {c['max_new_tokens']} new tokens each"
    lines = scenario_heading("json-schema", c, what) + [
        "",
        "| method | decode tok/s | ÷ target-only | acceptance | jump-forward tokens | grammar ÷ time | valid |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in s.items():
        lines.append(f"| {name} | {m['decode_tokens_per_s']:.2f} | **{m['vs_target_only']:.2f}** | "
                     f"{m['acceptance_rate']:.2f} ({m['accepted']}/{m['proposed']}) | {m['forced']} | "
                     f"{100 * m['grammar_share']:.1f}% | {m['valid']}/{c['requests']} |")  # fmt: skip
    return "\n".join(lines + identical_footer(report, "requests")) + "\n"
