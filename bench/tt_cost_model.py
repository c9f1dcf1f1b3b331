"""An estimate, not a measurement: the custom tt-metal verify kernel's work per call, per core, from its loop structure;
beside it, the stock-ttnn path's operation count per call, counted by running it on the numpy model of its operations.

No Tenstorrent hardware has run these kernels, so this counts what the kernel sources do and multiplies by assumed
unit costs, printed beside the counts so that anyone can redo it with better ones:

* element visits on the data-movement RISC-V cores (reader.cpp, writer.cpp): per real row (padding rows get no
  pass), a worker makes 1 max pass (reader), 2 x ROUNDS radix-histogram passes where the tile-row filters (top-k
  and top-p searches; none where no row does), a kept-mass pass, a totals pass (which also reads q when drafts
  carry probabilities) and a pick pass, each over its vocabulary slice; the aggregator, one core, reads every
  worker's record for every real row in each sync round (48 words a row in a radix round);
* SFPU tiles on the Tensix compute engine (softmax_numerator.cpp): one scaled exp per slice tile per tile-row;
* NOC traffic: each round a worker writes one record and increments a semaphore; the aggregator writes W result
  blocks and W semaphore increments.

Each shape is given with every row filtering (top-k and top-p: both searches run) and with none (temperature
only, or greedy: no search).

The stock path (specdec.tt.stock) is a sequence of ttnn calls; its count depends on the rows' filters, so it is given
for three batches: greedy, sampled without filters, and sampled with top-p 0.9 (a full sort of the scaled logits).
Calls are split into those over the whole [rows, V] (elementwise, reductions, cumsum, sort) and those on per-row
columns, with the bytes uploaded (logits, dense q, the per-row columns) and read back.

    python bench/tt_cost_model.py [--cycles-per-visit 8,20] [--grid 8x8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import numpy as np  # noqa: E402

from specdec.tt import model, stock  # noqa: E402
from specdec.tt.ops_numpy import NumpyOps  # noqa: E402
from specdec.tt.program import plan  # noqa: E402

ROWS, RADIX, ROUNDS = 32, 16, 8  # specdec_tt_algo.hpp
# Words per row a worker sends, and the aggregator reads, in each sync round of a tile-row (writer.cpp): the max,
# 2 x ROUNDS radix searches (count and 64-bit mass per bin) where the tile-row filters, the kept mass, the totals,
# the pick.
MAX_WORDS, SEARCH_WORDS, TAIL_WORDS = 2, 3 * RADIX, [2, 10, 1]
SHAPES = [(1, 4, 128256), (8, 4, 128256), (32, 0, 128256)]
# Assumptions, each a stated guess: Wormhole's AICLK (tt-metal reports 1000 MHz on n150/n300); an SFPU
# exp-and-multiply pass over one 32x32 fp32 tile; the cost of issuing one small NOC write or semaphore increment
# and of a round trip through the aggregator (the NOC's latency is a few hundred cycles).
CLOCK_HZ = 1.0e9
SFPU_CYCLES_PER_TILE = 2_000
NOC_ISSUE_CYCLES = 100
ROUND_TRIP_CYCLES = 1_000


def estimate(B: int, K: int, V: int, grid: tuple[int, int], cycles_per_visit: float, filtered: bool = True) -> dict:
    p = plan(B, K, V, logits_dtype="bfloat16", has_q=K > 0, grid=grid)
    W, tiles = p.n_workers, max(n for _, n in p.split)
    cols = tiles * 32  # one pass over the slice for one row
    search_rounds = 2 * ROUNDS if filtered else 0
    rounds = 1 + search_rounds + len(TAIL_WORDS)
    passes = 1 + search_rounds + 3 + (1 if K > 0 else 0)  # the totals pass reads q as well when there are drafts
    words = MAX_WORDS + search_rounds * SEARCH_WORDS + sum(TAIL_WORDS)
    worker_visits = p.rows * passes * cols
    aggregator_visits = p.rows * W * words
    noc_ops = p.row_tiles * rounds * (2 * W + 2)  # aggregator writes + semaphores; a worker's own two
    worker_cycles = worker_visits * cycles_per_visit + p.row_tiles * rounds * (2 * NOC_ISSUE_CYCLES + ROUND_TRIP_CYCLES)
    aggregator_cycles = aggregator_visits * cycles_per_visit + p.row_tiles * rounds * 2 * W * NOC_ISSUE_CYCLES
    sfpu_cycles = p.row_tiles * tiles * SFPU_CYCLES_PER_TILE
    # Workers and the aggregator take turns each round; the exp overlaps the reader's next tiles.
    critical = worker_cycles + aggregator_cycles
    return {
        "B": B, "K": K, "V": V, "filtered": filtered, "rows": p.rows, "row_tiles": p.row_tiles,
        "padding_rows": p.row_tiles * ROWS - p.rows, "workers": W, "slice_tiles": tiles,
        "sync_rounds": p.row_tiles * rounds, "worker_element_visits": worker_visits,
        "aggregator_element_visits": aggregator_visits, "noc_ops": noc_ops, "sfpu_tiles_per_worker": p.row_tiles * tiles,
        "cycles_per_visit": cycles_per_visit, "worker_cycles": worker_cycles, "aggregator_cycles": aggregator_cycles,
        "sfpu_cycles": sfpu_cycles, "estimated_ms": 1e3 * critical / CLOCK_HZ,
    }  # fmt: skip


STOCK_BATCHES = {"greedy": dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0),
                 "sampled": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0),
                 "sampled, top-p 0.9": dict(temperature=0.8, top_k=0, top_p=0.9, min_p=0.0)}  # fmt: skip


class _CountingOps(NumpyOps):
    """NumpyOps that counts each operation by whether it spans the full vocabulary width, and the bytes moved."""

    def __init__(self, V: int) -> None:
        super().__init__()
        self.V, self.wide, self.narrow, self.up, self.down = V, 0, 0, 0, 0
        self.kinds: dict[str, int] = {}

    def __getattribute__(self, name):
        attr = super().__getattribute__(name)
        if name.startswith("_") or name in ("iota", "row_multiple", "col_multiple", "V", "wide", "narrow", "up",
                                             "down", "kinds") or not callable(attr):  # fmt: skip
            return attr

        def counted(*args, **kw):
            out = attr(*args, **kw)
            if name == "put":
                self.up += out.nbytes
            elif name == "get":
                self.down += np.asarray(out).nbytes
            else:
                wide = max(np.shape(a)[-1] if np.ndim(a) == 2 else 0 for a in args) >= self.V
                if wide:
                    self.wide += 1
                    self.kinds[name] = self.kinds.get(name, 0) + 1
                else:
                    self.narrow += 1
            return out

        return counted


def stock_operations(B: int, K: int, V: int, batch: str) -> dict:
    """Run the stock path once on (B, K, V) with dense draft probabilities and count its ttnn calls."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((B * (K + 1), V)) * 3).astype(np.float32)
    q = np.full((B * (K + 1), V), 1.0 / V, np.float32) if K else None
    nd = np.full(B, K)
    draft = rng.integers(0, V, (B, K))
    prm = model.row_params(B, K, nd, draft, u_accept=np.zeros((B, K + 1)), u_sample=np.zeros((B, K + 1)),
                           **STOCK_BATCHES[batch])  # fmt: skip
    ops = _CountingOps(V)
    stock.rows(ops, logits, q, prm, np.full(B * (K + 1), 0.5))
    return {"B": B, "K": K, "V": V, "batch": batch, "full_width_calls": ops.wide, "column_calls": ops.narrow,
            "full_width_by_op": dict(sorted(ops.kinds.items())), "bytes_up": ops.up, "bytes_down": ops.down}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles-per-visit", default="8,20", help="RISC-V cycles per element visit, low,high (default 8,20)")
    ap.add_argument("--grid", default="8x8", help="compute grid, e.g. 8x8 (Wormhole n150) or 13x10 (Blackhole)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    cpv = [float(x) for x in args.cycles_per_visit.split(",")]
    gx, gy = (int(x) for x in args.grid.lower().split("x"))
    rows = [estimate(B, K, V, (gx, gy), c, f) for B, K, V in SHAPES for f in (True, False) for c in cpv]
    print(f"custom tt verify kernel, {gx}x{gy} grid, {CLOCK_HZ / 1e9:.1f} GHz assumed; an estimate from loop counts")
    print("| (B, K, V) | rows filter | rows (padding) | workers × slice tiles | sync rounds | worker visits | "
          "aggregator visits | NOC ops | cycles/visit | estimated ms per call |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| ({r['B']}, {r['K']}, {r['V']}) | {'top-k, top-p' if r['filtered'] else 'no'} | {r['rows']} "
              f"({r['padding_rows']}) | {r['workers']} × {r['slice_tiles']} | {r['sync_rounds']} | "
              f"{r['worker_element_visits']:,} | {r['aggregator_element_visits']:,} | {r['noc_ops']:,} | "
              f"{r['cycles_per_visit']:g} | {r['estimated_ms']:.1f} |")  # fmt: skip
    stock_rows = [stock_operations(B, K, V, batch) for B, K, V in SHAPES for batch in STOCK_BATCHES]
    print("\nstock-ttnn path (specdec.tt.stock): ttnn calls per verify call, counted on the numpy model; dense q")
    print("| (B, K, V) | batch | calls over [rows, V] | calls on columns | full-width calls by op | MB up | KB down |")
    print("|---|---|---|---|---|---|---|")
    for r in stock_rows:
        ops = ", ".join(f"{k} {v}" for k, v in r["full_width_by_op"].items())
        print(f"| ({r['B']}, {r['K']}, {r['V']}) | {r['batch']} | {r['full_width_calls']} | {r['column_calls']} | {ops} | "
              f"{r['bytes_up'] / 1e6:.1f} | {r['bytes_down'] / 1e3:.1f} |")  # fmt: skip
    if args.json_path:
        assumptions = {"clock_hz": CLOCK_HZ, "sfpu_cycles_per_tile": SFPU_CYCLES_PER_TILE,
                       "noc_issue_cycles": NOC_ISSUE_CYCLES, "round_trip_cycles": ROUND_TRIP_CYCLES}  # fmt: skip
        Path(args.json_path).write_text(json.dumps({"assumptions": assumptions, "rows": rows, "stock": stock_rows},
                                                   indent=1) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
