"""Time the small-M linear kernels alone: y[M, N] = x[M, K] · W[N, K]^T per weight type, path and M.

The default pair's largest shapes: the target's MLP (8960 × 1536), the draft's MLP (4864 × 896) and the draft's
LM head (151936 × 896), each as float32 and bfloat16 weights and in the quantised kernel's 8-bit (``int8``) and
4-bit (``q4``) layouts, on every vector path this CPU runs. A memory-bound kernel costs about the same at M = 1
and M = 8 (each weight is read once); the ratio column shows how far from that each M is.

    python bench/linear_kernel.py [--repeats 9] [--paths avx512,avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
import torch

from specdec.models import isa, quant
from specdec.models import linear as fast_linear

SHAPES = [(8960, 1536), (4864, 896), (151936, 896)]
ROWS = [1, 2, 4, 5, 8, 16]


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--paths", default=",".join(p for p in isa.supported() if p != "portable"))
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = []
    print(f"small-M linear kernel, median of {args.repeats} (ms; ratio to M=1), {torch.get_num_threads()} threads")
    print(f"{'N x K':>13} {'weights':>8} {'path':>7} | " + " | ".join(f"{'M=' + str(m):>14}" for m in ROWS))
    for n, k in SHAPES:
        w = torch.randn(n, k) / k**0.5
        weights = {"float32": (w, fast_linear.linear), "bfloat16": (w.to(torch.bfloat16), fast_linear.linear),
                   "int8": (quant.quantize(w, "int8"), quant.linear), "q4": (quant.quantize(w, "q4"), quant.linear)}  # fmt: skip
        for name, (weight, fn) in weights.items():
            for path in args.paths.split(","):
                row = {"n": n, "k": k, "weights": name, "path": path, "ms": {}}
                for m in ROWS:
                    x = torch.randn(m, k)
                    row["ms"][m] = median_ms(lambda: fn(x, weight, isa=path), args.repeats)
                base = row["ms"][1]
                cells = " | ".join(f"{row['ms'][m]:7.2f} ({row['ms'][m] / base:4.2f}×)" for m in ROWS)
                print(f"{n:>6} x {k:<5} {name:>8} {path:>7} | {cells}")
                results.append(row)
        del w, weights
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"threads": torch.get_num_threads(), "repeats": args.repeats, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
