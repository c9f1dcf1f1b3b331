"""How long a running stream stalls while a long prompt joins it, with and without chunked prefill.

One request decodes; after two steps a long prompt (the first N tokens of specdec's engine source) joins the
batch. Per chunk size and method this prints the running stream's largest and median gap between emitting
steps until the long request has finished, and the long request's time to its first token. All wall-clock,
in one process, on the default pair (or --target/--draft).

    python bench/prefill_stall.py [--prompt-tokens 600] [--chunks 0,256,128] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
from specdec.engine import core as engine_module
from specdec.engine import Engine, EngineConfig
from specdec.types import FinishReason, GenerationRequest, Method, SpeculationParams


def stall(engine: Engine, short_ids: list[int], long_ids: list[int], chunk: int, method: Method) -> tuple[float, float, float]:
    """(largest gap, median gap, long prompt's TTFT) in seconds."""
    engine.config = replace(engine.config, prefill_chunk=chunk)
    spec = SpeculationParams(method=method)
    running = engine.start(GenerationRequest(short_ids, 1000, ignore_eos=True, speculation=spec))
    engine.step_batch([running])
    engine.step_batch([running])
    joining = engine.start(GenerationRequest(long_ids, 8, ignore_eos=True, speculation=spec))
    joined = last = time.perf_counter()
    gaps, ttft = [], None
    while not joining.finished:
        out_running, out_joining = engine.step_batch([running, joining])
        now = time.perf_counter()
        if out_running.token_ids:
            gaps.append(now - last)
            last = now
        if ttft is None and out_joining.token_ids:
            ttft = now - joined
    engine.finish(running, FinishReason.CANCELLED)
    engine.release(joining)
    return max(gaps), statistics.median(gaps), ttft


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--prompt-tokens", type=int, default=600)
    ap.add_argument("--chunks", default="0,256,128", help="prefill chunk sizes to compare (0: one forward)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    target, draft = args.target, args.draft
    if target is None:
        from specdec.models.fetch import default_pair

        target, draft = default_pair()
    engine = Engine.load(target, draft, config=EngineConfig(prefix_cache_bytes=0))  # every request cold
    tok = engine.tokenizer
    long_ids = tok(open(engine_module.__file__).read())["input_ids"][: args.prompt_tokens]
    short_ids = engine.encode("Write a Python function that merges two sorted lists.")
    methods = [Method.NONE] + ([Method.DRAFT] if draft else [])
    print(f"a {len(long_ids)}-token prompt joins a running stream (s)")
    for _ in range(args.repeats):
        for method in methods:
            for chunk in (int(c) for c in args.chunks.split(",")):
                worst, median, ttft = stall(engine, short_ids, long_ids, chunk, method)
                print(f"{method.value:>5}, chunk {chunk:>4}: running stream's largest gap {worst:6.2f}, median {median:5.2f};"
                      f" long prompt's TTFT {ttft:6.2f}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
