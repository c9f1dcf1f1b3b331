"""The suffix drafter's cost per step: a lookup (and the step's insertion of its new tokens) with --tokens tokens
in the index, against the length of the context.

Documents are drawn from a Zipf distribution over a 151,936-id vocabulary, and a third of each repeats a span of an
earlier one (as re-sent conversations and edited files do), so lookups find matches of every length.

    python bench/suffix_lookup.py [--tokens 200000] [--steps 2000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from specdec.bench.environment import host_info
from specdec.engine.drafters.suffix import SuffixIndex

VOCAB = 151_936


def documents(total: int, rng: np.random.Generator) -> list[list[int]]:
    docs: list[list[int]] = []
    size = 0
    while size < total:
        n = int(rng.integers(200, 3000))
        doc = list((rng.zipf(1.2, n) % VOCAB).astype(int))
        if docs and rng.random() < 0.7:
            src = docs[int(rng.integers(len(docs)))]
            a = int(rng.integers(len(src)))
            span = src[a : a + n // 3]
            at = int(rng.integers(n))
            doc[at : at + len(span)] = span
        docs.append(doc)
        size += len(doc)
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--gamma", type=int, default=8)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    index = SuffixIndex(max_tokens=2 * args.tokens)  # no eviction: every lookup runs over all of them
    t0 = time.perf_counter()
    docs = documents(args.tokens, rng)
    for d in docs:
        index.add(d)
    build_s = time.perf_counter() - t0
    results = {}
    for context_len in (100, 2000, 20000):
        src = docs[int(rng.integers(len(docs)))]
        context = (src * (context_len // len(src) + 1))[:context_len]
        doc = index.add(context)
        lookups, steps, drafted = [], [], 0
        for _ in range(args.steps):
            t0 = time.perf_counter()
            draft = index.lookup(context[-8:], args.gamma)
            t1 = time.perf_counter()
            new = draft[:2] if draft else [int(rng.zipf(1.2)) % VOCAB]
            context += new
            index.extend(doc, new)
            t2 = time.perf_counter()
            lookups.append(t1 - t0)
            steps.append(t2 - t0)
            drafted += len(draft)
        results[context_len] = {
            "lookup_ms_median": statistics.median(lookups) * 1e3,
            "lookup_ms_p99": float(np.percentile(lookups, 99)) * 1e3,
            "step_ms_median": statistics.median(steps) * 1e3,
            "mean_draft_tokens": drafted / args.steps,
        }
        r = results[context_len]
        print(f"context {context_len:6d}: lookup median {r['lookup_ms_median']:.3f} ms, p99 {r['lookup_ms_p99']:.3f} ms; "
              f"lookup + insertion {r['step_ms_median']:.3f} ms; {r['mean_draft_tokens']:.1f} tokens drafted a step")  # fmt: skip
    print(f"index: {index.tokens} tokens at the end; built in {build_s:.1f} s "
          f"({build_s / args.tokens * 1e6:.1f} µs per token)")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host_info(), "tokens": index.tokens, "build_s": build_s,
                                               "steps": args.steps, "by_context": results}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
