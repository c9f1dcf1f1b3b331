"""Quantised weights that hold a GGUF file's values exactly, and the linear layer that multiplies them as stored.

A ``QuantWeight`` is the small-M kernel's format (csrc/linear/quant.hpp): a code per weight (4 or 8 bits) and a
scale, and optionally a min, per group of 16 or 32 weights of a row: w = scale · code − min. The scales are float32
per group, or, for the K-quants, two-level as stored: an int8 sub-scale per group times a float32 scale per block of
256 (2 bytes per group streamed instead of 8). Every GGUF type served here is such a code and such a group, so
``from_gguf`` repacks the stored blocks without changing one value:

    GGUF   bits group  codes        scale          min
    Q4_0    4    32    q            d              8·d
    Q5_0    8    32    q − 16       d              -
    Q8_0    8    32    q            d              -
    Q4_K    4    32    q            d · sc         dmin · m      (two-level)
    Q5_K    8    32    q            d · sc         dmin · m      (two-level)
    Q6_K    8    16    q − 32       d · sc         -             (two-level)

(d, dmin float16; sc, m the 6-bit or 8-bit sub-block integers: each product is exact in float32.) Other types
(Q2_K, Q3_K, the IQ types, ...) raise ``UnsupportedTensor`` naming the tensor and its type. ``quantize`` makes
the same format from float weights (``--dtype int8``: symmetric 8-bit, ``q4``: 4-bit with a min, groups of 32).

The kernel quantises each row of activations to int8 per chunk of 128 columns and sums every group exactly in
int32, so a forward of 1-32 rows gives the same bits per row as one row (batch-invariant); see ``linear``. Many
rows (a prefill) take ``Bound.gemm`` instead: the weight dequantised exactly, a tile at a time, into torch's GEMM.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from specdec import _kernels
from specdec.models import isa as isa_mod

CHUNK = 128  # columns per activation scale; the kernel needs K to be a multiple of it
# Rows per kernel call for inputs of many rows (a prefill): each call streams the weights once and multiplies them
# into these rows from cache; fewer calls stream less, more rows per call keep more activations in cache
# (`python bench/linear_rows.py --rows 64,128,256,512` prints the time per row count).
SLICE_ROWS = 128


class UnsupportedTensor(ValueError):
    """A GGUF tensor whose type the quantised kernel does not hold."""


BLOCK = 256  # weights per float scale in the two-level layout (a K-quant super-block)


TENSORS = ("codes", "scales", "mins", "sub_scales", "sub_mins")  # a QuantWeight's tensors, all indexed by row


@dataclass
class QuantWeight:
    """w[N, K] = scale[:, g] · code − min[:, g] for the group g of each column (see the module docstring)."""

    codes: torch.Tensor  # uint8 [N, K · bits / 8] (8-bit codes are int8 values viewed as uint8)
    scales: torch.Tensor  # float32 [N, K / group], or [N, K / BLOCK] where sub_scales is set
    mins: torch.Tensor | None  # float32, shaped as scales
    bits: int
    group: int
    kind: str  # the GGUF type it came from, or "int8" / "q4" where quantised at load
    sub_scales: torch.Tensor | None = None  # int8 [N, K / group]: scale[:, g] = scales[:, g·group // BLOCK] · this
    sub_mins: torch.Tensor | None = None  # int8 [N, K / group], where mins is set: min likewise

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * 8 // self.bits

    @property
    def block(self) -> int:
        """Weights per float scale: BLOCK in the two-level layout, else the group."""
        return self.group if self.sub_scales is None else BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return tuple(getattr(self, name) for name in TENSORS)

    def layout(self) -> tuple[int, int, int, bool]:
        """What two weights need in common to be stacked into one: bits, group, block, and whether they have mins."""
        return self.bits, self.group, self.block, self.mins is not None

    def rows(self, index: torch.Tensor | slice) -> QuantWeight:
        """The weight's rows ``index`` (a slice gives views)."""
        return _with_tensors(self, [None if t is None else t[index] for t in self.tensors()])

    def group_scales(self, rows: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor | None]:
        """float32 scale and min per group [len(rows), K / group] (exact: an int8 times a float16 value)."""
        return self._per_group(self.scales, self.sub_scales, rows), self._per_group(self.mins, self.sub_mins, rows)

    def _per_group(self, top: torch.Tensor | None, sub: torch.Tensor | None, rows) -> torch.Tensor | None:
        if top is None or sub is None:
            return None if top is None else top[rows]
        return top[rows].repeat_interleave(BLOCK // self.group, dim=1) * sub[rows].to(torch.float32)

    def dequantize(self, rows: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """float32 [len(rows), K]: the stored values, exactly."""
        codes = self.codes[rows]
        scales, mins = self.group_scales(rows)
        n = codes.shape[0]
        if self.bits == 4:
            packed = codes.view(n, -1, CHUNK // 2)
            c = torch.cat([packed & 0x0F, packed >> 4], dim=-1).to(torch.float32)
        else:
            c = codes.view(torch.int8).view(n, -1, CHUNK).to(torch.float32)
        w4 = self.group // 4  # stored positions → weight order: the inverse of the kernel's chunk_position
        c = c.reshape(n, -1, 4, 32 // w4, w4).transpose(-3, -2).reshape(n, -1, CHUNK)
        w = c.reshape(n, -1, self.group) * scales[..., None]
        if mins is not None:
            w = w - mins[..., None]
        return w.reshape(n, -1)


def _with_tensors(like: QuantWeight, tensors: list[torch.Tensor | None], kind: str | None = None) -> QuantWeight:
    """``like`` with its tensors (in TENSORS order) replaced."""
    return QuantWeight(*tensors[:3], like.bits, like.group, kind or like.kind, *tensors[3:])


def stack(parts: list[QuantWeight]) -> QuantWeight:
    """One weight whose rows are ``parts``' rows in order; every part must share its layout."""
    if len({p.layout() for p in parts}) != 1:
        raise ValueError(f"cannot stack quantised weights of different layouts: {[p.kind for p in parts]}")
    kinds = "+".join(dict.fromkeys(p.kind for p in parts))
    columns = zip(*(p.tensors() for p in parts))
    return _with_tensors(parts[0], [None if c[0] is None else torch.cat(c) for c in columns], kinds)


# ---- packing ---------------------------------------------------------------------------------------------------


# bits, group, weights per block, bytes per block
GGUF_TYPES = {"Q4_0": (4, 32, 32, 18), "Q5_0": (8, 32, 32, 22), "Q8_0": (8, 32, 32, 34),
              "Q4_K": (4, 32, 256, 144), "Q5_K": (8, 32, 256, 176), "Q6_K": (8, 16, 256, 210)}  # fmt: skip
_WITH_MINS = ("Q4_0", "Q4_K", "Q5_K")


def from_gguf(name: str, kind: str, raw: np.ndarray, k: int, requantize_to: str | None = None) -> QuantWeight:
    """Repack GGUF tensor ``name`` of type ``kind`` (its raw bytes [N, bytes per row]) of K = ``k`` columns, in C++
    (csrc/linear/pack.cpp) straight from the file's pages into the kernel's arrays; or, with ``requantize_to``
    ("int8" or "q4"), quantise its stored values as ``quantize`` would, without a float copy (a cheaper draft)."""
    if kind not in GGUF_TYPES:
        raise UnsupportedTensor(f"GGUF tensor {name!r} has type {kind}; the quantised kernel holds {sorted(GGUF_TYPES)}"
                                " (load with --dtype float32 to dequantise the file instead)")  # fmt: skip
    if k % CHUNK:
        raise UnsupportedTensor(f"GGUF tensor {name!r} has {k} columns, not a multiple of {CHUNK}; load with --dtype float32")
    bits, group, per_block, block_bytes = GGUF_TYPES[kind]
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    n = raw.shape[0]
    if raw.shape[1:] != (k // per_block * block_bytes,):
        raise ValueError(f"GGUF tensor {name!r}: {kind} rows of {k} columns take {k // per_block * block_bytes} bytes, got shape {raw.shape}")
    type_index = _kernels.GGUF_REPACK_TYPES.index(kind)
    if requantize_to is not None:
        w = _empty(n, k, requantize_to)
        _kernels.requantize_gguf(type_index, raw.ctypes.data, n, k, int(requantize_to == "q4"), *_pointers(w)[:3])
        return w
    two_level = per_block == BLOCK
    scales = torch.empty(n, k // per_block)
    mins = torch.empty(n, k // per_block) if kind in _WITH_MINS else None
    sub_scales = torch.empty(n, k // group, dtype=torch.int8) if two_level else None
    sub_mins = torch.empty(n, k // group, dtype=torch.int8) if two_level and mins is not None else None
    w = QuantWeight(torch.empty(n, k * bits // 8, dtype=torch.uint8), scales, mins, bits, group, kind, sub_scales, sub_mins)
    _kernels.repack_gguf(type_index, raw.ctypes.data, n, k, *_pointers(w))
    return w


def quantize(weight: torch.Tensor, kind: str) -> QuantWeight:
    """Quantise float weights [N, K] in groups of 32: "int8" symmetric (scale max|w| / 127), "q4" 4-bit with a min
    (scale (max − min) / 15), in C++ (csrc/linear/pack.cpp)."""
    n, k = weight.shape
    if k % CHUNK:
        raise ValueError(f"weight has {k} columns; quantising needs a multiple of {CHUNK}")
    w = _empty(n, k, kind)
    for r in range(0, n, 4096):  # in slices: a float32 copy of a whole LM head is half a GiB
        rows = weight[r : r + 4096].to(torch.float32).contiguous()
        part = w.rows(slice(r, r + rows.shape[0]))
        _kernels.quantize_weights(int(kind == "q4"), rows.data_ptr(), rows.shape[0], k, *_pointers(part)[:3])
    return w


def _empty(n: int, k: int, kind: str) -> QuantWeight:
    """An uninitialised weight [n, k] of a format quantised at load ("int8" or "q4"), for the C++ to fill."""
    if kind not in ("int8", "q4"):
        raise ValueError(f"kind must be 'int8' or 'q4', got {kind!r}")
    bits = 4 if kind == "q4" else 8
    mins = torch.empty(n, k // 32) if kind == "q4" else None
    return QuantWeight(torch.empty(n, k * bits // 8, dtype=torch.uint8), torch.empty(n, k // 32), mins, bits, 32, kind)


def _pointers(w: QuantWeight) -> list[int]:
    """The addresses of ``w``'s tensors in TENSORS order (0 for an absent one)."""
    return [0 if t is None else t.data_ptr() for t in w.tensors()]


# ---- the linear layer -----------------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] · w^T + bias through the quantised kernel, float32, in slices of SLICE_ROWS rows.

    Each activation row is quantised to int8 per 128 columns (scale max|x| / 127); every group's sum is exact.
    ``isa`` forces a path (default: this process's, ``specdec.models.isa.ISA``).
    """
    return Bound(weight, bias).kernel(x, isa=isa)


class Bound:
    """``linear`` with its weight and bias fixed and their addresses looked up once: a decode step makes a hundred
    and more such calls, each of a few hundred microseconds, so the per-call Python counts (`python
    bench/verify_cost.py`).

    ``kernel`` runs the small-M kernel (batch-invariant: a row's bits do not depend on the other rows); ``gemm``
    dequantises the weight a tile at a time and multiplies with torch's GEMM, which many rows (a prefill) keep
    busy where the kernel would be bound by its per-row work (``GEMM_ROWS``)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.bias = None if bias is None else bias.to(torch.float32).contiguous()
        self._weight_args = (*_pointers(weight), weight.bits, weight.group, weight.block)
        self._args = (*self._weight_args, 0 if self.bias is None else self.bias.data_ptr())

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"x must have {k} features to match weight [{n}, {k}], got shape {tuple(x.shape)}")
        return x.reshape(-1, k)

    def kernel(self, x: torch.Tensor, *, isa: str | None = None) -> torch.Tensor:
        """x [..., K] → [..., N] float32 through the small-M kernel on ``isa`` (default: this process's path)."""
        n, k = self.weight.shape
        x2 = self._rows(x)
        path = isa_mod.code(isa)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        y = torch.empty(x2.shape[0], n, dtype=torch.float32)
        x_at, y_at = x2.data_ptr(), y.data_ptr()  # float32: 4 bytes per element
        for r in range(0, x2.shape[0], SLICE_ROWS):
            rows = min(SLICE_ROWS, x2.shape[0] - r)
            _kernels.linear_quant(x_at + 4 * r * k, *self._args, y_at + 4 * r * n, rows, n, k, path)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def gemm(self, x: torch.Tensor, blocks: list[tuple[int, int]], out: torch.Tensor) -> None:
        """out[a:b] = x[a:b] · weightᵀ + bias for each (a, b) of ``blocks``, each block its own GEMM (so a row's bits
        depend on its block's rows alone); x [T, K], out [T, N] float32, rows outside the blocks untouched. The weight
        is dequantised exactly a tile of rows at a time (to bfloat16 where ``gemm_dtype`` says so) and each tile
        multiplies every block in that dtype."""
        n, k = self.weight.shape
        dtype = gemm_dtype()
        xs = [x[a:b].to(dtype) for a, b in blocks]
        tile = max(1, min(n, GEMM_TILE // k))
        buf = torch.empty(tile, k, dtype=dtype)
        for j0 in range(0, n, tile):
            j1 = min(n, j0 + tile)
            _kernels.dequantize_rows(*self._weight_args, n, k, j0, j1, buf.data_ptr(), dtype == torch.bfloat16)
            for (a, b), xb in zip(blocks, xs):
                out[a:b, j0:j1] = torch.mm(xb, buf[: j1 - j0].t())
        if self.bias is not None:
            for a, b in blocks:
                out[a:b] += self.bias


# Positions per GEMM: a prompt's positions [i·GEMM_ROWS, (i+1)·GEMM_ROWS), aligned to the sequence's start, multiply
# each linear by a GEMM of their own, where the kernel would be bound by its per-row work (`python
# bench/linear_rows.py --rows 16,32,64,128` prints both). Aligned blocks give a position the same bits whichever
# chunk computed it, which a cached prefix relies on.
GEMM_ROWS = 64
# Weights per dequantised tile (16 MiB of bfloat16): fewer, larger GEMM calls beat cache-sized tiles, as
# `python bench/long_prompt.py` measures the prefill.
GEMM_TILE = 1 << 23


def gemm_dtype() -> torch.dtype:
    """bfloat16 where this process takes the AVX-512 path on a CPU with bfloat16 arithmetic (AMX or AVX-512 BF16),
    whose GEMM is several times float32's; float32 elsewhere (as on an AVX2 host, or with SPECDEC_ISA=avx2)."""
    return torch.bfloat16 if _bf16_arithmetic() and isa_mod.ISA == "avx512" else torch.float32


@functools.cache
def _bf16_arithmetic() -> bool:
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


class _Quantised(torch.nn.Module):
    """A module holding a ``QuantWeight`` as buffers (so ``buffers()``, ``to()`` and the memory counts see it)."""

    def __init__(self, weight: QuantWeight) -> None:
        super().__init__()
        for name, tensor in zip(TENSORS, weight.tensors()):
            self.register_buffer(name, tensor)
        self.bits, self.group, self.kind = weight.bits, weight.group, weight.kind

    @property
    def weight_q(self) -> QuantWeight:
        return _with_tensors(self, [getattr(self, name) for name in TENSORS])

    @weight_q.setter
    def weight_q(self, weight: QuantWeight) -> None:
        for name, tensor in zip(TENSORS, weight.tensors()):
            setattr(self, name, tensor)


class QuantLinear(_Quantised):
    """A Linear over a ``QuantWeight``: the kernel on a CPU without autograd, else torch over the dequantised weight
    (and, on a CPU without a kernel path, over a bfloat16 copy made once)."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__(weight)
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(torch.float32), requires_grad=False)
        self._dense: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled() and isa_mod.ISA is not None:
            return linear(x, self.weight_q, self.bias).to(x.dtype)
        if self._dense is None or self._dense.device != x.device:
            self._dense = self.weight_q.dequantize().to(device=x.device, dtype=torch.bfloat16)
        bias = None if self.bias is None else self.bias.to(x.device, x.dtype)
        return F.linear(x, self._dense.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


class QuantEmbedding(_Quantised):
    """An embedding table held as a ``QuantWeight``: each looked-up row is dequantised (exactly) when used."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).cpu()
        rows = self.weight_q.dequantize(flat).to(self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim).to(ids.device)


def quantize_model(model: torch.nn.Module, kind: str) -> int:
    """Quantise every nn.Linear of ``model`` whose width the kernel takes as ``kind``, in place; return how many. The
    input embedding keeps its weights (a tied LM head gets its own quantised copy). A GGUF file is requantised as
    it is read instead (``from_gguf``'s ``requantize_to``)."""
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, torch.nn.Linear) and child.in_features % CHUNK == 0]  # fmt: skip
    for parent, name, child in targets:
        bias = None if child.bias is None else child.bias.detach()
        setattr(parent, name, QuantLinear(quantize(child.weight.detach(), kind), bias))
    return len(targets)
