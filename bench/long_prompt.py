"""A long prompt: specdec's time to first token against llama.cpp's prefill of the same tokens, and what the draft's
catch-up on the prompt adds after it, on this process's kernel path.

The prompt is the first --tokens tokens of the committed text bench/data/perplexity.txt (repeated if short). One
path per process (``SPECDEC_ISA``; under ``avx2`` torch's own prefill GEMM and attention are held to AVX2 too, see
``specdec.torch_env``), interleaved per repeat:

- target-only: a request of 2 new tokens through the engine (its default chunked prefill); TTFT;
- speculative: the same request with the draft drafter and 4 new tokens; TTFT, and the draft's time in the request
  (its catch-up over the whole prompt, then a few drafts), as a fraction of the target-only TTFT;
- llama.cpp (llama-cpp-python, optional): ``eval`` of the same ids from an empty cache, same threads.

    python bench/long_prompt.py [--tokens 2000] [--repeats 2] [--json out.json]
    SPECDEC_ISA=avx2 python bench/long_prompt.py ...
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
import torch

from specdec.bench.environment import host_info
from specdec.bench.llamacpp import LlamaCpp
from specdec.bench.runners import time_engine
from specdec.engine import Engine, EngineConfig
from specdec.models import isa
from specdec.models.fetch import default_pair
from specdec.types import GenerationRequest, Method, SpeculationParams

TEXT = Path(__file__).parent / "data" / "perplexity.txt"


def request(ids: list[int], method: Method, n: int) -> GenerationRequest:
    return GenerationRequest(prompt_ids=ids, max_new_tokens=n, ignore_eos=True,
                             speculation=SpeculationParams(method=method, gamma=0 if method == Method.NONE else 4))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    target, draft = default_pair()
    engine = Engine.load(target, draft, config=EngineConfig(prefix_cache_bytes=0))  # every request cold
    ids = engine.encode(TEXT.read_text())
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[: args.tokens]
    peer = None if args.no_llamacpp else LlamaCpp(target, threads=torch.get_num_threads(), context=args.tokens + 64)
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.repeats):
        base = time_engine(engine, [request(ids, Method.NONE, 2)])[0]
        spec = time_engine(engine, [request(ids, Method.DRAFT, 4)])[0]
        out = runs.setdefault("specdec", {"ttft_s": [], "spec_ttft_s": [], "draft_s": []})
        out["ttft_s"].append(base["ttft_s"])
        out["spec_ttft_s"].append(spec["ttft_s"])
        out["draft_s"].append(spec["draft_s"])
        if peer is not None:
            peer.llm.reset()
            t0 = time.perf_counter()
            peer.llm.eval(ids)
            runs.setdefault("llamacpp", {"prefill_s": []})["prefill_s"].append(time.perf_counter() - t0)
    med = {way: {k: statistics.median(v) for k, v in m.items()} for way, m in runs.items()}
    lcp = med.get("llamacpp", {}).get("prefill_s")
    print(f"a {len(ids)}-token prompt, median of {args.repeats}" + (f"; llama.cpp prefill {lcp:.2f} s" if lcp else ""))
    m = med["specdec"]
    vs = f", TTFT ÷ llama.cpp prefill {m['ttft_s'] / lcp:.2f}" if lcp else ""
    print(f"{isa.ISA} path: target-only TTFT {m['ttft_s']:.2f} s ({len(ids) / m['ttft_s']:.0f} tok/s){vs}; speculative TTFT "
          f"{m['spec_ttft_s']:.2f} s; draft in the request {m['draft_s']:.2f} s = {m['draft_s'] / m['ttft_s']:.2f} of the "
          "target's prefill")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_info(), "threads": torch.get_num_threads(), "tokens": len(ids),
                                               "median": med, "runs": runs}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
