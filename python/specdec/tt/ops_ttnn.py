"""``TtnnOps``: the operations of ``specdec.tt.stock`` on a Tenstorrent device, one stock ttnn call each.

Every tensor is float32 in TILE layout in DRAM; results come back through ``get`` only (four numbers a row). The
reductions run with fp32 accumulation in the destination registers at full fidelity (ttnn's accurate float32 path);
exp runs in its accurate mode. Binary operations and comparisons broadcast a [R, 1] column along the rows, which
ttnn's elementwise operations document ("any dimensions of size 1 ... will be expanded"). ``CALLS`` lists each
ttnn function used with the keywords passed, which the tt job checks against the installed ttnn's documentation.

Not yet run on a device (see docs/tenstorrent.md).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# ttnn function -> keyword arguments this module passes it (checked by tests/tt/test_stock_ttnn.py)
CALLS: dict[str, tuple[str, ...]] = {
    "from_torch": ("dtype", "layout", "device", "memory_config"),
    "to_torch": (),
    "add": (),
    "multiply": (),
    "subtract": (),
    "maximum": (),
    "minimum": (),
    "exp": ("fast_and_approximate_mode",),
    "relu": (),
    "ge": (),
    "lt": (),
    "le": (),
    "eq": (),
    "ne": (),
    "where": (),
    "max": ("dim", "keepdim", "compute_kernel_config"),
    "min": ("dim", "keepdim", "compute_kernel_config"),
    "sum": ("dim", "keepdim", "compute_kernel_config"),
    "sort": ("dim", "descending"),
    "topk": ("k", "dim", "largest", "sorted"),
    "cumsum": ("dim",),
    "gather": ("dim", "index"),
    "typecast": (),
}


class TtnnOps:
    """``specdec.tt.stock.Ops`` on ``device`` through ``ttnn`` (``torch`` only to move arrays in and out)."""

    row_multiple = 32
    col_multiple = 32

    def __init__(self, device, ttnn=None, torch=None) -> None:
        if ttnn is None:
            import ttnn
        if torch is None:
            import torch
        self.ttnn, self.torch, self.device = ttnn, torch, device
        self.compute = ttnn.WormholeComputeKernelConfig(
            math_fidelity=ttnn.MathFidelity.HiFi4, math_approx_mode=False, fp32_dest_acc_en=True
        )
        self._iota: dict[tuple[int, int], Any] = {}

    def put(self, a: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        return self.ttnn.from_torch(t, dtype=self.ttnn.float32, layout=self.ttnn.TILE_LAYOUT, device=self.device,
                                    memory_config=self.ttnn.DRAM_MEMORY_CONFIG)  # fmt: skip

    def get(self, t: Any) -> np.ndarray:
        return np.asarray(self.ttnn.to_torch(t).float().numpy())

    def iota(self, rows: int, n: int) -> Any:
        if (rows, n) not in self._iota:  # uploaded once per shape
            self._iota[rows, n] = self.put(np.broadcast_to(np.arange(n, dtype=np.float32), (rows, n)))
        return self._iota[rows, n]

    def add(self, a, b):
        return self.ttnn.add(a, b)

    def mul(self, a, b):
        return self.ttnn.multiply(a, b)

    def sub(self, a, b):
        return self.ttnn.subtract(a, b)

    def maximum(self, a, b):
        return self.ttnn.maximum(a, b)

    def minimum(self, a, b):
        return self.ttnn.minimum(a, b)

    def exp(self, a):
        return self.ttnn.exp(a, fast_and_approximate_mode=False)

    def relu(self, a):
        return self.ttnn.relu(a)

    def ge(self, a, b):
        return self.ttnn.ge(a, b)

    def lt(self, a, b):
        return self.ttnn.lt(a, b)

    def le(self, a, b):
        return self.ttnn.le(a, b)

    def eq(self, a, b):
        return self.ttnn.eq(a, b)

    def ne(self, a, b):
        return self.ttnn.ne(a, b)

    def where(self, c, a, b: float):
        return self.ttnn.where(c, a, b)

    def row_max(self, a):
        return self.ttnn.max(a, dim=-1, keepdim=True, compute_kernel_config=self.compute)

    def row_min(self, a):
        return self.ttnn.min(a, dim=-1, keepdim=True, compute_kernel_config=self.compute)

    def row_sum(self, a):
        return self.ttnn.sum(a, dim=-1, keepdim=True, compute_kernel_config=self.compute)

    def sort_desc(self, a):
        return self.ttnn.sort(a, dim=-1, descending=True)[0]

    def topk(self, a, k: int):
        return self.ttnn.topk(a, k=k, dim=-1, largest=True, sorted=True)[0]

    def cumsum(self, a):
        return self.ttnn.cumsum(a, dim=-1)

    def gather(self, a, idx):
        return self.ttnn.gather(a, dim=-1, index=self.ttnn.typecast(idx, self.ttnn.uint32))
