"""Route the few-row linear layers of decode and verify forwards through the small-M C++ kernel.

At 1-32 rows (one decode token, a verify of γ+1 tokens, or a batch of them) a CPU forward is bound by
reading the weights. The kernel streams each weight row from memory once for all rows, so verifying k
tokens costs about one decode step, and it reduces every output element in the same order for any row
count: a verify forward and a one-token decode produce bit-identical linear outputs (batch invariance).
Larger inputs (prefill) keep torch's GEMM. The kernel takes the process's instruction-set path
(``specdec.models.isa``); on a CPU with none, ``install`` leaves torch's GEMM in place. Quantised weights have
their own layer, ``specdec.models.quant.QuantLinear``.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from specdec import _kernels
from specdec.models import isa as isa_mod

# Up to this many rows take the kernel, and the batch invariance ends here: about where the kernel's time stops
# beating torch's GEMM on Qwen2.5-1.5B's MLP shapes (`python bench/linear_rows.py` prints kernel ÷ torch per row count).
MAX_ROWS = 32
# Rows the kernel multiplies by each weight row in registers: up to this many a forward costs about one row's;
# each further block of rows reuses the weights from cache and adds compute (`python bench/linear_rows.py`).
ROWS_PER_PASS: int = _kernels.rows_per_pass
_WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] · weight[N, K]^T + bias[N] on the CPU; weight float32 or bfloat16.

    ``isa`` forces a path (default: this process's, ``specdec.models.isa.ISA``).
    """
    if weight.dtype not in _WEIGHT_TYPES or not weight.is_contiguous() or weight.device.type != "cpu":
        raise ValueError(f"weight must be a contiguous CPU float32 or bfloat16 tensor, got {weight.dtype} on {weight.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features to match weight [{n}, {k}], got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    _kernels.linear_small_m(
        x2.data_ptr(), weight.data_ptr(), _WEIGHT_TYPES[weight.dtype], 0 if b is None else b.data_ptr(), y.data_ptr(),
        x2.shape[0], n, k, isa_mod.code(isa),
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.numel() // x.shape[-1] <= MAX_ROWS and not torch.is_grad_enabled():
        return linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def install(model: torch.nn.Module) -> int:
    """Give every eligible nn.Linear of ``model`` the small-M path; return how many were patched (none on a CPU
    without a kernel path)."""
    if isa_mod.ISA is None:
        return 0
    patched = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w is not None and w.device.type == "cpu" and w.dtype in _WEIGHT_TYPES:
            if w.is_contiguous():
                module.forward = types.MethodType(_forward, module)
                patched += 1
    return patched
