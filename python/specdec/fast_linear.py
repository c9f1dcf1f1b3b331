"""Route the few-row linear layers of decode and verify forwards through the small-M C++ kernel.

At 1-16 rows (one decode token, or a verify of γ+1 tokens) a CPU forward is bound by reading the
weights. The kernel streams each weight row once for all rows, so verifying k tokens costs about one
decode step, and it reduces every output element in the same order for any row count: a verify
forward and a one-token decode produce bit-identical linear outputs (batch invariance).
Larger inputs (prefill) keep torch's GEMM.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from specdec import _kernels

MAX_ROWS = 16
_WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1}


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] · weight[N, K]^T + bias[N]; x float32 on the CPU, weight float32 or bfloat16."""
    if weight.dtype not in _WEIGHT_TYPES or not weight.is_contiguous() or weight.device.type != "cpu":
        raise ValueError(f"weight must be a contiguous CPU float32 or bfloat16 tensor, got {weight.dtype} on {weight.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features to match weight [{n}, {k}], got shape {tuple(x.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    _kernels.linear_small_m(
        x2.data_ptr(), weight.data_ptr(), _WEIGHT_TYPES[weight.dtype], 0 if b is None else b.data_ptr(), y.data_ptr(), x2.shape[0], n, k
    )
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() // x.shape[-1] <= MAX_ROWS and not torch.is_grad_enabled():
        return linear(x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def install(model: torch.nn.Module) -> int:
    """Give every eligible nn.Linear of ``model`` the small-M path; return how many were patched."""
    patched = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and w is not None and w.device.type == "cpu" and w.dtype in _WEIGHT_TYPES:
            if w.is_contiguous():
                module.forward = types.MethodType(_forward, module)
                patched += 1
    return patched
