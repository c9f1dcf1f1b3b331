"""The small-M kernel against torch's GEMM at 1-32 rows, float32 weights streamed from memory.

The target's MLP shapes (8960 × 1536 and 1536 × 8960), five copies of each cycled so that no matrix is still in the
last-level cache when it comes round again (as in a forward over a 6 GB model). This is where specdec.models.linear.MAX_ROWS
comes from: the kernel takes the rows up to which it beats torch.

    python bench/linear_rows.py [--rows 1,8,16,24,32,40] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time

from specdec.openmp import passive_waits

passive_waits()  # before torch loads OpenMP

# ruff: noqa: E402
import torch
import torch.nn.functional as F

from specdec.models import linear as fast_linear

SHAPES = [(8960, 1536), (1536, 8960)]
COPIES = 5  # 5 × 55 MB per shape: past a 300 MB last-level cache


def ms_per_matrix(fns: dict, weights: list[torch.Tensor], xs: dict[int, torch.Tensor], repeats: int) -> dict[str, float]:
    """Median ms per matrix of each fn, the fns interleaved per repeat in alternating order (the host drifts)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn(xs[weights[0].shape[1]], weights[0])
    for r in range(repeats):
        for name in list(fns) if r % 2 == 0 else list(fns)[::-1]:
            t0 = time.perf_counter()
            for w in weights:
                fns[name](xs[w.shape[1]], w)
            times[name].append((time.perf_counter() - t0) / len(weights) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,16,24,32,40")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES for _ in range(COPIES)]
    print(f"ms per matrix, median of {args.repeats}, {torch.get_num_threads()} threads, kernel up to {fast_linear.MAX_ROWS} rows")
    one = None
    with torch.inference_mode():
        for m in (int(r) for r in args.rows.split(",")):
            xs = {k: torch.randn(m, k) for _, k in SHAPES}
            ms = ms_per_matrix({"kernel": fast_linear.linear, "torch": F.linear}, weights, xs, args.repeats)
            kernel, gemm = ms["kernel"], ms["torch"]
            one = one or kernel
            print(f"M={m:3d}  kernel {kernel:7.2f} ({kernel / one:4.2f}x M=1)  torch {gemm:7.2f}  kernel/torch {kernel / gemm:4.2f}")


if __name__ == "__main__":
    main()
