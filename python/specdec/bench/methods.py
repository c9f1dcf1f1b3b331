"""``specdec bench --scenario methods``: every method on the same prompts in one run (the built-in prompts, or
--prompts-file).

Each prompt is decoded greedily by target-only, the draft model, suffix drafting and the hybrid of the two, in an
order that rotates from prompt to prompt, so a ratio between two methods (the hybrid ÷ the draft model, say) comes
from one run on the same prompts rather than from two runs of a host whose speed moves. The first ``--warmup``
prompts run but stay out of the summary. The prefix cache is paused, so every method meets each prompt cold, and each
method drafts under its own cache scope, so the suffix drafter learns from that method's earlier prompts and
outputs alone (as in a run of that method by itself), never from another method's answer to the same prompt.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from specdec.bench.environment import identical_footer, method_table, scenario_config, scenario_heading
from specdec.bench.options import BenchOptions
from specdec.bench.runners import RunCounter, encode_prompt, pooled_by_method, rotating_runs, scenario_report
from specdec.types import GenerationRequest, Method, SpeculationParams


def run_methods(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None) -> dict:
    methods = [m.value for m in [Method.NONE] + ([Method.DRAFT] if engine.draft is not None else []) + [Method.SUFFIX]
               + ([Method.AUTO] if engine.draft is not None else [])]  # fmt: skip
    rows, t_start, load_start = [], time.time(), os.getloadavg()
    counter = RunCounter(progress, len(options.prompts) * len(methods))
    with engine.prefix_cache.paused():
        for i, prompt in enumerate(options.prompts):
            ids = encode_prompt(engine, prompt, options.chat, options.max_prompt_tokens)

            def request_for(name: str, ids=ids, i=i) -> GenerationRequest:
                speculation = SpeculationParams(method=Method(name), cache_scope=f"bench-{name}")
                return GenerationRequest(prompt_ids=ids, max_new_tokens=options.max_new_tokens, speculation=speculation,
                                         request_id=f"p{i}-{name}")  # fmt: skip

            rows.append({"category": prompt.category, "warmup": i < options.warmup, "prompt_tokens": len(ids),
                         **rotating_runs(engine, methods, i, request_for, counter, f"prompt {i}")})  # fmt: skip
    measured = [row for row in rows if not row["warmup"]]
    config = scenario_config(engine, options.max_new_tokens, t_start, load_start, prompts=len(measured),
                             warmup=options.warmup)  # fmt: skip
    summary = pooled_by_method({m: [row["runs"][m] for row in measured] for m in methods})
    return scenario_report("methods", config, summary, "prompts", rows)


def methods_to_markdown(report: dict) -> str:
    c = report["config"]
    what = (f"{c['prompts']} prompts (after {c['warmup']} warm-up), greedy, up to {c['max_new_tokens']} new tokens each, "
            "every method on each prompt")  # fmt: skip
    lines = scenario_heading("methods", c, what) + [""] + method_table(report["summary"])
    return "\n".join(lines + identical_footer(report, "prompts")) + "\n"
