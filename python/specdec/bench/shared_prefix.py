"""``specdec bench --scenario shared-prefix``: requests that share a long system prompt (data/system_prompt.txt,
about 1,300 tokens of rules and tool descriptions) and differ in a short question, with the prefix cache on and
off in one run.

- One stream: each question in turn, with the cache and without it (the cache paused: a cold prefill), the order
  alternating per question. The warm-up request fills the cache, so every measured request with the cache finds
  the system prompt in it, as on a server that has seen it before. TTFT median on ÷ off.
- N streams at once (the first --concurrency level, default 4), each running --requests-per-stream questions:
  aggregate tokens/s with the cache on ÷ off, alternating which goes first.
Greedy runs check that every output with the cache equals the same request's without it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

from specdec.bench.concurrency import _time_streams
from specdec.bench.environment import run_environment, scenario_heading
from specdec.bench.options import BenchOptions
from specdec.bench.runners import time_engine
from specdec.types import GenerationRequest, SamplingParams, SpeculationParams

SYSTEM_PROMPT = Path(__file__).parent / "data" / "system_prompt.txt"
DEFAULT_STREAMS = 4


def run_shared_prefix(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None,
                      system: str | None = None) -> dict:
    """The scenario on ``engine`` (its prefix cache on); ``system``: the shared system prompt (default: SYSTEM_PROMPT)."""
    options.validate()
    progress = progress or (lambda event: None)
    cache = engine.prefix_cache
    if cache.budget == 0:
        raise ValueError("the shared-prefix scenario needs the prefix cache: give --prefix-cache-bytes > 0")
    system = SYSTEM_PROMPT.read_text(encoding="utf-8") if system is None else system
    if options.chat and getattr(engine.tokenizer, "chat_template", None):
        prompts = [engine.encode_chat([{"role": "system", "content": system}, {"role": "user", "content": p.text}])
                   for p in options.prompts]  # fmt: skip
    else:
        prompts = [engine.encode(f"{system}\n\n{p.text}") for p in options.prompts]
    shared = _common_prefix(prompts)
    speculation = SpeculationParams(options.method, options.gamma, options.gamma_max)
    base_seed = options.sampling.seed if options.sampling.seed is not None else 1234

    def request(i: int, tag: str) -> GenerationRequest:
        return GenerationRequest(prompt_ids=prompts[i % len(prompts)], max_new_tokens=options.max_new_tokens,
                                 ignore_eos=True, sampling=SamplingParams(**{**asdict(options.sampling), "seed": base_seed + i}),
                                 speculation=speculation, request_id=f"{tag}-{i}")  # fmt: skip

    def way(on: bool):
        return nullcontext() if on else cache.paused()

    t_start, load_start = time.time(), os.getloadavg()
    cache.clear()
    measured = range(options.warmup, len(prompts))
    n_streams = options.concurrency[0] if options.concurrency else DEFAULT_STREAMS
    total = options.warmup + 2 * len(measured) + 2
    done = 0
    for i in range(options.warmup):  # fills the cache with the system prompt
        with way(True):
            time_engine(engine, [request(i, "warmup")])
        done += 1
        progress({"event": "done", "done": done, "total": total, "message": f"warm-up {i}"})
    single: dict[str, list[dict]] = {"on": [], "off": []}
    for n, i in enumerate(measured):
        for name in ("on", "off") if n % 2 == 0 else ("off", "on"):
            with way(name == "on"):
                single[name].append(time_engine(engine, [request(i, name)])[0])
            done += 1
            progress({"event": "done", "done": done, "total": total,
                      "message": f"question {i}, cache {name}: TTFT {single[name][-1]['ttft_s']:.2f} s"})  # fmt: skip
    per_stream = options.requests_per_stream
    streams: dict[str, dict] = {}
    for name in ("on", "off"):
        batch = [[request(options.warmup + k * per_stream + j, f"{name}-s{k}") for j in range(per_stream)]
                 for k in range(n_streams)]  # fmt: skip
        with way(name == "on"):
            streams[name] = _time_streams(engine, batch)
        done += 1
        progress({"event": "done", "done": done, "total": total,
                  "message": f"{n_streams} streams, cache {name}: {streams[name]['tokens_per_s']:.2f} tok/s"})  # fmt: skip
    ttft = {name: statistics.median(r["ttft_s"] for r in runs) for name, runs in single.items()}
    greedy = options.sampling.greedy
    identical = None
    if greedy:
        outputs = [[r["output_ids"] for r in single[n]] for n in ("on", "off")]
        stream_outputs = [[d["output_ids"] for d in streams[n]["requests_detail"]] for n in ("on", "off")]
        identical = outputs[0] == outputs[1] and stream_outputs[0] == stream_outputs[1]
    return {
        "scenario": "shared-prefix",
        "config": {
            "target": engine.info()["target"],
            "draft": engine.info()["draft"],
            "method": options.method.value,
            "max_new_tokens": options.max_new_tokens,
            "prompts": len(measured),
            "prompt_tokens": [len(p) for p in prompts],
            "shared_prefix_tokens": shared,
            "prefix_cache_bytes": cache.budget,
            "streams": n_streams,
            "requests_per_stream": per_stream,
            "sampling": asdict(options.sampling),
            **run_environment(t_start, load_start),
        },
        "single_stream": {
            "ttft_on_s": ttft["on"],
            "ttft_off_s": ttft["off"],
            "ttft_ratio": ttft["on"] / ttft["off"],
            "cached_prompt_tokens": [r["cached_prompt_tokens"] for r in single["on"]],
            "runs": single,
        },
        "streams": {
            "on": streams["on"],
            "off": streams["off"],
            "tokens_per_s_ratio": streams["on"]["tokens_per_s"] / streams["off"]["tokens_per_s"],
        },
        "identical_outputs": identical,
        "cache_bytes_after": cache.bytes,
    }


def shared_prefix_to_markdown(report: dict) -> str:
    c, one, many = report["config"], report["single_stream"], report["streams"]
    what = (f"{c['prompts']} questions behind one system prompt ({c['shared_prefix_tokens']} shared tokens); "
            f"{c['max_new_tokens']} new tokens; method {c['method']}")
    lines = scenario_heading("shared-prefix", c, what) + [
        "",
        "| | cache on | cache off | on ÷ off |",
        "|---|---|---|---|",
        f"| TTFT, one stream (median s) | {one['ttft_on_s']:.2f} | {one['ttft_off_s']:.2f} | **{one['ttft_ratio']:.2f}** |",
        f"| aggregate tok/s, {c['streams']} streams | {many['on']['tokens_per_s']:.2f} | {many['off']['tokens_per_s']:.2f} "
        f"| **{many['tokens_per_s_ratio']:.2f}** |",
        f"| TTFT p50, {c['streams']} streams (s) | {many['on']['ttft_s']['p50']:.2f} | {many['off']['ttft_s']['p50']:.2f} | "
        f"{many['on']['ttft_s']['p50'] / many['off']['ttft_s']['p50']:.2f} |",
        "",
        f"Prompt tokens from the cache per request (one stream): {one['cached_prompt_tokens']}. "
        f"Outputs identical with the cache on and off: {report['identical_outputs']}.",
    ]
    return "\n".join(lines) + "\n"


def _common_prefix(prompts: list[list[int]]) -> int:
    n = min(len(p) for p in prompts)
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return n
