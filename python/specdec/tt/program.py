"""Host side of the device program: the plan (pure Python) and the ttnn.ProgramDescriptor built from it.

``plan(...)`` decides everything that depends only on (B, K, V), the dtype and the core grid: the
worker/aggregator cores, the vocabulary split, circular-buffer sizes and the per-core argument
lists.  It imports nothing from ttnn, so it is unit-tested anywhere.  ``build_program(...)`` turns a
plan plus the device tensors' addresses and TensorAccessor arguments into ttnn descriptors; the
tensors' parts are passed in so that the descriptors can be built and inspected without a device
(mock cluster), and the runner (``runtime.py``) supplies the real ones.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from specdec.tt.jit_check import KERNELS, KERNEL_DIR
from specdec.tt.model import split_vocab

TILE = 32
TILE_ELEMS = TILE * TILE
FP32_TILE_BYTES = TILE_ELEMS * 4
PARAM_WORDS = 16
# Circular-buffer L1 budget per core.  Wormhole has 1464 KiB of L1 per Tensix core and Blackhole
# 1536 KiB; firmware, kernel binaries and the runtime config take the first ~100-200 KiB.
L1_CB_BUDGET = {"wormhole_b0": 1_250_000, "blackhole": 1_300_000}
SEM_AGG, SEM_WORK = 0, 1
# The aggregator's writer takes 15 + 2 * n_workers runtime args (tt-metal allows a few hundred per
# kernel) and keeps per-worker state for at most MAX_WORKERS (128) in its scratch buffer.
MAX_WORKERS = 120


def _header_constants() -> dict[str, int]:
    """constexpr uint32_t NAME = value; from the kernels' shared header (single source of truth)."""
    src = (KERNEL_DIR / "specdec_tt_algo.hpp").read_text()
    consts: dict[str, int] = {}
    for name, expr in re.findall(r"constexpr uint32_t (\w+) = ([^;]+);", src):
        expr = re.sub(r"\b(0x[0-9A-Fa-f]+|\d+)[uU]\b", r"\1", expr)
        try:
            consts[name] = int(eval(expr, {"__builtins__": {}}, dict(consts)))  # only literals, shifts and products of them
        except Exception:
            continue
    return consts


HDR = _header_constants()
CB = {k: v for k, v in HDR.items() if k.startswith("CB_")}
REC_BYTES = HDR["REC_BYTES"]
RES_BYTES = HDR["RES_BYTES"]


@dataclass
class CBPlan:
    index: int
    dtype: str  # "bfloat16" | "float32" | "uint32"
    page_size: int
    pages: int
    on: str  # "all" (every core of the program) | "group1" | "group2" (workers with n1 / n2 tiles)

    @property
    def total_size(self) -> int:
        return self.page_size * self.pages


@dataclass
class Plan:
    B: int
    K1: int
    V: int
    rows: int
    row_tiles: int
    vocab_tiles: int
    logits_dtype: str
    has_q: bool
    arch: str
    grid: tuple[int, int]
    workers: list[tuple[int, int]]  # logical (x, y) in worker order
    aggregator: tuple[int, int]
    split: list[tuple[int, int]]  # (first_tile, n_tiles) per worker
    out_row_words: int
    cbs: dict[str, CBPlan] = field(default_factory=dict)

    @property
    def n_workers(self) -> int:
        return len(self.workers)

    @property
    def x_tile_bytes(self) -> int:
        return TILE_ELEMS * (4 if self.logits_dtype == "float32" else 2)

    @property
    def groups(self) -> dict[str, list[tuple[int, int]]]:
        """Workers by slice size: group1 holds the larger share (n1 tiles), group2 one tile less."""
        n1 = max(n for _, n in self.split)
        g1 = [c for c, (_, n) in zip(self.workers, self.split) if n == n1]
        g2 = [c for c, (_, n) in zip(self.workers, self.split) if n != n1]
        return {"group1": g1, "group2": g2}

    def cbs_on(self, core: tuple[int, int]) -> list[CBPlan]:
        g = self.groups
        where = "group1" if core in g["group1"] else "group2" if core in g["group2"] else None
        return [cb for cb in self.cbs.values() if cb.on == "all" or cb.on == where]

    def l1_bytes(self) -> int:
        """Largest circular-buffer footprint over the program's cores."""
        return max(sum(cb.total_size for cb in self.cbs_on(c)) for c in [*self.workers, self.aggregator])

    # per-core argument lists (the kernels' documented order) ---------------------------------------
    def reader_runtime_args(self, addr: dict[str, int]) -> dict[tuple[int, int], list[int]]:
        q = addr.get("q", addr["logits"])
        out = {}
        for w, core in enumerate(self.workers):
            first, n = self.split[w]
            out[core] = [addr["logits"], addr["params"], q, 0, first, n, self.vocab_tiles, self.V, self.row_tiles]
        out[self.aggregator] = [addr["logits"], addr["params"], q, 1, 0, 0, self.vocab_tiles, self.V, self.row_tiles]
        return out

    def compute_runtime_args(self) -> dict[tuple[int, int], list[int]]:
        return {core: [self.split[w][1], self.row_tiles] for w, core in enumerate(self.workers)}

    def writer_runtime_args(self, addr: dict[str, int], noc_xy) -> dict[tuple[int, int], list[int]]:
        ax, ay = noc_xy(self.aggregator)
        common = [self.V, self.rows, self.row_tiles, self.B, self.K1, addr["out"], self.out_row_words, ax, ay,
                  SEM_AGG, SEM_WORK]
        out = {}
        for w, core in enumerate(self.workers):
            first, n = self.split[w]
            out[core] = [0, w, first, n, *common]
        coords = [c for core in self.workers for c in noc_xy(core)]
        out[self.aggregator] = [1, 0, 0, 0, *common, *coords]
        return out

    def reader_compile_args(self, acc: dict[str, list[int]]) -> list[int]:
        q = acc.get("q", acc["logits"])
        return [int(self.logits_dtype == "float32"), int(self.has_q), self.x_tile_bytes, *acc["logits"],
                *acc["params"], *q]

    def writer_compile_args(self, acc: dict[str, list[int]]) -> list[int]:
        return [int(self.has_q), self.n_workers, *acc["out"]]


def plan(B: int, K: int, V: int, *, logits_dtype: str = "bfloat16", has_q: bool = True,
         grid: tuple[int, int] = (8, 8), arch: str = "wormhole_b0") -> Plan:
    """Plan the program for target logits [B, K+1, V] (K = 0 for ``sample``)."""
    if B < 1 or K < 0 or V < 1:
        raise ValueError(f"bad shape B={B} K={K} V={V}")
    if logits_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"logits_dtype must be bfloat16 or float32, got {logits_dtype}")
    gx, gy = grid
    if gx * gy < 2:
        raise ValueError("need at least 2 cores (1 worker + 1 aggregator)")
    K1 = K + 1
    rows = B * K1
    row_tiles = -(-rows // TILE)
    vt = -(-V // TILE)
    aggregator = (gx - 1, gy - 1)
    order = [(x, y) for x in range(gx) for y in range(gy) if (x, y) != aggregator]  # column-major
    split = split_vocab(vt, min(len(order), MAX_WORKERS))
    workers = order[: len(split)]
    p = Plan(B=B, K1=K1, V=V, rows=rows, row_tiles=row_tiles, vocab_tiles=vt, logits_dtype=logits_dtype,
             has_q=has_q, arch=arch, grid=grid, workers=workers, aggregator=aggregator, split=split,
             out_row_words=-(-(K1 + 1) // 16) * 16)  # 64-byte rows: DRAM alignment on both archs
    n_max = max(n for _, n in split)
    c = p.cbs
    # Buffers on every core first, with the same sizes everywhere, so that tt-metal gives them the same
    # L1 address on every core (the writer addresses another core's mailbox/result by its own address).
    c["x"] = CBPlan(CB["CB_X"], logits_dtype, p.x_tile_bytes, 2, "all")
    c["xmax"] = CBPlan(CB["CB_XMAX"], "float32", FP32_TILE_BYTES, 1, "all")
    c["invt"] = CBPlan(CB["CB_INVT"], "float32", FP32_TILE_BYTES, 1, "all")
    c["params"] = CBPlan(CB["CB_PARAMS"], "uint32", TILE * PARAM_WORDS * 4, 1, "all")
    c["localmax"] = CBPlan(CB["CB_LOCALMAX"], "uint32", TILE * 2 * 4, 1, "all")
    c["mailbox"] = CBPlan(CB["CB_MAILBOX"], "uint32", REC_BYTES * p.n_workers, 1, "all")
    c["result"] = CBPlan(CB["CB_RESULT"], "uint32", RES_BYTES, 1, "all")
    c["rec"] = CBPlan(CB["CB_REC"], "uint32", REC_BYTES, 1, "all")
    c["rowres"] = CBPlan(CB["CB_ROWRES"], "uint32", row_tiles * TILE * 16, 1, "all")
    c["out"] = CBPlan(CB["CB_OUT"], "uint32", p.out_row_words * 4, 1, "all")
    c["scratch"] = CBPlan(CB["CB_SCRATCH"], "uint32", HDR["SCRATCH_BYTES"], 1, "all")
    # The resident slices last, sized per worker group: a worker's CB holds exactly its n tiles, so
    # the n pages of every tile-row start at the ring's base and are contiguous (the writer reads them
    # as one array).  With one size for all, a worker with one tile less would wrap on the 2nd tile-row.
    for group, n in (("group1", n_max), ("group2", n_max - 1)):
        if not p.groups[group]:
            continue
        if has_q:
            c["q_" + group] = CBPlan(CB["CB_Q"], "float32", FP32_TILE_BYTES, n, group)
        c["e_" + group] = CBPlan(CB["CB_E"], "float32", FP32_TILE_BYTES, n, group)
    budget = L1_CB_BUDGET[arch]
    if p.l1_bytes() > budget:
        raise ValueError(
            f"circular buffers need {p.l1_bytes()} B of L1 per core (budget {budget}) for V={V} on a "
            f"{gx}x{gy} grid ({n_max} vocabulary tiles per worker); use a larger grid")
    return p


# ---------------------------------------------------------------------------------------------------
def _ranges(ttnn, cores):
    """CoreRangeSet of the given logical cores: one CoreRange per contiguous run in a column."""
    by_x: dict[int, list[int]] = {}
    for x, y in cores:
        by_x.setdefault(x, []).append(y)
    rngs = []
    for x, ys in sorted(by_x.items()):
        ys = sorted(ys)
        start = prev = ys[0]
        for y in ys[1:] + [None]:
            if y is not None and y == prev + 1:
                prev = y
                continue
            rngs.append(ttnn.CoreRange(ttnn.CoreCoord(x, start), ttnn.CoreCoord(x, prev)))
            if y is not None:
                start = prev = y
    return ttnn.CoreRangeSet(rngs)


def _rtargs(ttnn, per_core: dict[tuple[int, int], list[int]]):
    ra = ttnn.RuntimeArgs()
    for (x, y), args in per_core.items():
        ra[x][y] = [int(a) for a in args]
    return ra


def build_program(p: Plan, addr: dict[str, int], acc: dict[str, list[int]], noc_xy):
    """The ttnn.ProgramDescriptor for plan ``p``.

    addr: buffer addresses of the device tensors {"logits", "params", "out", ["q"]};
    acc: their TensorAccessorArgs compile-time args; noc_xy(logical (x, y)) -> NOC (x, y) used by the
    writer's core-to-core writes (``device.worker_core_from_logical_core`` on a device).
    """
    import ttnn

    dtypes = {"bfloat16": ttnn.bfloat16, "float32": ttnn.float32, "uint32": ttnn.uint32}
    all_cores = _ranges(ttnn, [*p.workers, p.aggregator])
    workers = _ranges(ttnn, p.workers)
    where = {"all": all_cores, **{g: _ranges(ttnn, cores) for g, cores in p.groups.items() if cores}}
    cbs = [
        ttnn.CBDescriptor(
            total_size=cb.total_size,
            core_ranges=where[cb.on],
            format_descriptors=[ttnn.CBFormatDescriptor(buffer_index=cb.index, data_format=dtypes[cb.dtype],
                                                        page_size=cb.page_size)],
        )
        for cb in p.cbs.values()
    ]
    compute_cfg = ttnn.ComputeConfigDescriptor(math_fidelity=ttnn.MathFidelity.HiFi4, math_approx_mode=False,
                                               fp32_dest_acc_en=True)
    unpack = [ttnn.UnpackToDestMode.Default] * 32
    for cb in p.cbs.values():
        if cb.dtype == "float32":
            unpack[cb.index] = ttnn.UnpackToDestMode.UnpackToDestFp32
    compute_cfg.unpack_to_dest_mode = unpack
    kernels = [
        ttnn.KernelDescriptor(kernel_source=str(KERNELS["reader"]), core_ranges=all_cores,
                              compile_time_args=p.reader_compile_args(acc),
                              runtime_args=_rtargs(ttnn, p.reader_runtime_args(addr)),
                              config=ttnn.ReaderConfigDescriptor()),
        ttnn.KernelDescriptor(kernel_source=str(KERNELS["compute"]), core_ranges=workers, compile_time_args=[],
                              runtime_args=_rtargs(ttnn, p.compute_runtime_args()), config=compute_cfg),
        ttnn.KernelDescriptor(kernel_source=str(KERNELS["writer"]), core_ranges=all_cores,
                              compile_time_args=p.writer_compile_args(acc),
                              runtime_args=_rtargs(ttnn, p.writer_runtime_args(addr, noc_xy)),
                              config=ttnn.WriterConfigDescriptor()),
    ]
    sems = [ttnn.SemaphoreDescriptor(id=i, core_ranges=all_cores, initial_value=0) for i in (SEM_AGG, SEM_WORK)]
    return ttnn.ProgramDescriptor(kernels=kernels, semaphores=sems, cbs=cbs)


__all__ = ["Plan", "CBPlan", "plan", "build_program", "CB", "Path"]
