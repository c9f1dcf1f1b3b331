"""The small-M kernels against torch's GEMM at 1-32 rows, weights streamed from memory, on every path this CPU runs.

The target's MLP shapes (8960 × 1536 and 1536 × 8960), five copies of each cycled so that no matrix is still in
the last-level cache when it comes round again (as in a forward over a whole model), as float32 weights, and in
the quantised kernel's layouts: 4-bit codes with two-level scales and mins (Q4_K), 8-bit codes with two-level
scales per 16 (Q6_K), and 8-bit codes with a float scale per 32 (Q8_0, Q5_0, ``int8``). Each line prints
the kernel's ms per matrix, its ratio to its own time at the first row count, and kernel ÷ torch's float32 GEMM
at the same rows. This is where specdec.models.linear.MAX_ROWS and specdec.models.quant.SLICE_ROWS come from
(``--rows 64,128,256`` for prefill-sized inputs).

    python bench/linear_rows.py [--rows 1,2,4,8,16,32] [--repeats 7] [--paths avx512,avx2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
import torch
import torch.nn.functional as F

from specdec.bench.environment import host_info
from specdec.models import isa, linear, quant

SHAPES = [(8960, 1536), (1536, 8960)]
COPIES = 5  # 5 × 55 MB of float32 per shape: past a 300 MB last-level cache
QUANTISED = {"Q4_K": ("q4", 32, True), "Q6_K": ("int8", 16, True), "Q8_0": ("int8", 32, False)}  # kind, group, two-level


def quantised(dense: torch.Tensor, kind: str, group: int, two_level: bool) -> quant.QuantWeight:
    """``dense`` quantised as ``kind``, re-laid out as the GGUF type's layout: the same bytes streamed and the same
    work, for timing (two-level scales get random sub-scales, so the values are not ``dense``'s)."""
    w = quant.quantize(dense, kind)
    if not two_level:
        return w
    n, k = w.shape
    gen = torch.Generator().manual_seed(0)
    sub = lambda: torch.randint(1, 64, (n, k // group), dtype=torch.int8, generator=gen)  # noqa: E731
    top = lambda t: None if t is None else t[:, :: quant.BLOCK // 32].contiguous() / 32  # noqa: E731
    return dataclasses.replace(w, group=group, scales=top(w.scales), mins=top(w.mins), sub_scales=sub(),
                               sub_mins=None if w.mins is None else sub())  # fmt: skip


def median_ms(fn, weights: list, xs: dict[int, torch.Tensor], repeats: int) -> float:
    fn(xs[weights[0][1]], weights[0][0])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for w, k in weights:
            fn(xs[k], w)
        times.append((time.perf_counter() - t0) / len(weights) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", default=",".join(p for p in isa.supported() if p != "portable"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = [(torch.randn(n, k) * 0.02, k) for n, k in SHAPES for _ in range(COPIES)]
    layouts = {"float32": (dense, linear.linear)}
    for name, spec in QUANTISED.items():
        layouts[name] = ([(quantised(w, *spec), k) for w, k in dense], quant.linear)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"ms per matrix, median of {args.repeats}, {torch.get_num_threads()} threads; torch = float32 weights")
    results = []
    with torch.inference_mode():
        for m in rows:
            xs = {k: torch.randn(m, k) for _, k in SHAPES}
            gemm = median_ms(F.linear, dense, xs, args.repeats)
            for name, (weights, fn) in layouts.items():
                for path in args.paths.split(","):
                    ms = median_ms(lambda x, w, p=path, f=fn: f(x, w, isa=p), weights, xs, args.repeats)
                    first = next((r["ms"] for r in results if (r["layout"], r["path"], r["rows"]) == (name, path, rows[0])), ms)
                    results.append({"rows": m, "layout": name, "path": path, "ms": ms, "torch_ms": gemm})
                    print(f"M={m:3d}  {name:13s} {path:7s} {ms:7.2f} ms ({ms / first:4.2f}x M={rows[0]})  "
                          f"torch {gemm:7.2f}  kernel/torch {ms / gemm:4.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": host_info(), "threads": torch.get_num_threads(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
