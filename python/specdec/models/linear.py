"""Route the few-row linear layers of decode and verify forwards through the small-M C++ kernel.

At 1-32 rows (one decode token, a verify of γ+1 tokens, or a batch of them) a CPU forward is bound by
reading the weights. The kernel streams each weight row from memory once for all rows, so verifying k
tokens costs about one decode step, and it reduces every output element in the same order for any row
count: a verify forward and a one-token decode produce bit-identical linear outputs (batch invariance).
Larger inputs (prefill) keep torch's GEMM, except through ``Int8Linear`` (see ``linear_int8``).

``Int8Linear`` is the int8 variant for a draft model: half the bytes of bfloat16 to stream per step, and a
draft's precision never changes the output, only how often its proposals are accepted. The kernel quantises
each activation row to int8 too (W8A8, one scale per row) and sums exactly in int32 with AVX-512 VNNI: measured
on the default draft's teacher-forced agreement with the target, 0.845 against 0.852 with float activations.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from specdec import _kernels

# Up to this many rows take the kernel, and the batch invariance ends here: about where the kernel's time stops
# beating torch's GEMM on Qwen2.5-1.5B's MLP shapes (`python bench/linear_rows.py` prints kernel ÷ torch per row count).
MAX_ROWS = 32
# Rows the kernel multiplies by each weight row in registers: up to this many a forward costs about one row's;
# each further block of rows reuses the weights from cache and adds compute (`python bench/linear_rows.py`).
ROWS_PER_PASS: int = _kernels.rows_per_pass
_WEIGHT_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """y[..., N] = x[..., K] · weight[N, K]^T (· scale[N]) + bias[N] on the CPU.

    weight is float32, bfloat16, or int8 with a float32 ``scale`` per row (required then, refused otherwise).
    With int8 weights each row of x is quantised first: y = sx · scale · Σ round(x / sx) · w, sx = max|x| / 127.
    """
    if weight.dtype not in _WEIGHT_TYPES or not weight.is_contiguous() or weight.device.type != "cpu":
        raise ValueError(f"weight must be a contiguous CPU float32, bfloat16 or int8 tensor, got {weight.dtype} on {weight.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features to match weight [{n}, {k}], got shape {tuple(x.shape)}")
    if (weight.dtype == torch.int8) != (scale is not None):
        raise ValueError("scale must be given exactly when weight is int8")
    if scale is not None and (scale.dtype != torch.float32 or scale.shape != (n,) or not scale.is_contiguous()):
        raise ValueError(f"scale must be a contiguous float32 tensor of shape ({n},), got {scale.dtype} {tuple(scale.shape)}")
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = None if bias is None else bias.to(torch.float32).contiguous()
    _kernels.linear_small_m(
        x2.data_ptr(), weight.data_ptr(), _WEIGHT_TYPES[weight.dtype], 0 if scale is None else scale.data_ptr(),
        0 if b is None else b.data_ptr(), y.data_ptr(), x2.shape[0], n, k,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def int8_is_fast() -> bool:
    """Whether int8 weights run on the VNNI path (else a portable loop gives the same bits, slowly)."""
    return _kernels.cpu_has_avx512_vnni()


def _forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.device.type == "cpu" and x.numel() // x.shape[-1] <= MAX_ROWS and not torch.is_grad_enabled():
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


_QUANTIZE_ROWS = 4096


# int8 layers take the kernel at any number of rows, this many per call: on the default draft this beats
# dequantising to bfloat16 for torch's GEMM for a catch-up of tens of tokens and for a prompt of hundreds (the
# draft's catch-up shows in `specdec bench`'s draft cost and TTFT).
INT8_SLICE_ROWS = 32


def linear_int8(x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor) -> torch.Tensor:
    """``linear`` with int8 weights for x [..., K] of any number of rows, in slices of INT8_SLICE_ROWS rows."""
    x2 = x.reshape(-1, x.shape[-1])
    parts = [linear(part, qweight, bias, scale) for part in x2.split(INT8_SLICE_ROWS)]
    y = parts[0] if len(parts) == 1 else torch.cat(parts)
    return y.reshape(*x.shape[:-1], qweight.shape[0])


class Int8Linear(torch.nn.Module):
    """A Linear with int8 weights and one float32 scale per output row (symmetric).

    CPU inference inputs go through the small-M kernel at any number of rows (``linear_int8``), which reads
    the int8 bytes directly and quantises the activations (see ``linear``); with autograd on, or off the CPU,
    the weight is dequantised to the activations' dtype for torch's GEMM.
    """

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qweight = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for r in range(0, w.shape[0], _QUANTIZE_ROWS):  # in slices: a float32 copy of a whole LM head is 0.5 GiB
            chunk = w[r : r + _QUANTIZE_ROWS].to(torch.float32)
            s = chunk.abs().amax(dim=1) / 127.0
            s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row stays zero
            qweight[r : r + _QUANTIZE_ROWS] = torch.round(chunk / s[:, None]).clamp_(-127, 127).to(torch.int8)
            scale[r : r + _QUANTIZE_ROWS] = s
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            return linear_int8(x, self.qweight, self.bias, self.scale)
        return F.linear(x, self.qweight.to(x.dtype).mul_(self.scale[:, None].to(x.dtype)), self.bias)


def quantize_int8(model: torch.nn.Module) -> int:
    """Replace every nn.Linear of ``model`` by an Int8Linear (the LM head too); return how many.

    A tied LM head gets its own int8 copy, and the input embedding keeps the original weights.
    """
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear)]  # fmt: skip
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child))
    return len(targets)
