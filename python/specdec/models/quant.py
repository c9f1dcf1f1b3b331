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
int32, so a forward of 1-32 rows gives the same bits per row as one row (batch-invariant); see ``linear``.
"""

from __future__ import annotations

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


def chunk_order(group: int) -> np.ndarray:
    """Which weight of a 128-column chunk the kernel stores at each position (chunk_position in
    csrc/linear/quant.hpp): interleaved so that every 4-byte lane of every 32-byte vector holds one group."""
    p = np.arange(CHUNK)
    w, t = group // 4, p % 32
    return group * (t // w) + w * (p // 32) + t % w
def to_stored_order(chunks: np.ndarray, group: int) -> np.ndarray:
    """chunks [..., CHUNK] in weight order → the same in stored order, ``chunks[..., chunk_order(group)]``: weight
    w·(4b + a) + c sits at position 32a + w·b + c (w = group / 4), a transpose of [32 / w, 4, w] that copies
    memory in runs, several times faster than the gather it equals on a model's worth of codes."""
    w = group // 4
    swapped = chunks.reshape(*chunks.shape[:-1], 32 // w, 4, w).swapaxes(-3, -2)
    return np.ascontiguousarray(swapped).reshape(chunks.shape)


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
        w4 = self.group // 4  # stored positions → weight order: the transpose to_stored_order undoes
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


# ---- packing --------------------------------------------------------------------------------------------------


def _pack(codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None, bits: int, group: int, kind: str,
          sub_scales: np.ndarray | None = None, sub_mins: np.ndarray | None = None) -> QuantWeight:  # fmt: skip
    """codes [N, K] (uint8 0..15 for 4 bits, int8 for 8), scales/mins [N, K / group] (or [N, K / BLOCK] with the
    int8 sub_scales/sub_mins [N, K / group]) → QuantWeight."""
    n, k = codes.shape
    stored = to_stored_order(codes.reshape(n, k // CHUNK, CHUNK), group)
    if bits == 4:
        chunks = stored.astype(np.uint8)
        packed = (chunks[:, :, : CHUNK // 2] | (chunks[:, :, CHUNK // 2 :] << 4)).reshape(n, k // 2)
    else:
        packed = np.ascontiguousarray(stored.astype(np.int8)).reshape(n, k).view(np.uint8)

    def tensor(a: np.ndarray | None, dtype: type) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a, dtype=dtype).reshape(n, -1))

    return QuantWeight(torch.from_numpy(np.ascontiguousarray(packed)), tensor(scales, np.float32), tensor(mins, np.float32),
                       bits, group, kind, tensor(sub_scales, np.int8), tensor(sub_mins, np.int8))  # fmt: skip


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes [..., B] whose low nibbles are the first ``width`` values of each span of 2·width and the high nibbles
    the next: [..., spans, width] bytes → [..., 2 · B] values, in order."""
    spans = qs.reshape(*qs.shape[:-1], -1, width)
    return np.stack([spans & 0x0F, spans >> 4], axis=-2).reshape(*qs.shape[:-1], -1)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K block from its 12 bytes [..., 12] → two [..., 8] uint8."""
    d, m, hi = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (hi & 0x0F) | ((d >> 6) << 4)], axis=-1)
    mn = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn


Arrays = tuple[np.ndarray, ...]


def _decode(kind: str, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Arrays]:
    """GGUF blocks [B, block_bytes] → codes [B, weights per block], scales and mins per block, and for the K-quants
    the int8 sub-scales (and sub-mins) [B, groups per block] (see _pack)."""
    if kind == "Q8_0":
        return blocks[:, 2:].view(np.int8), _f16(blocks[:, :2])[:, None], None, ()
    if kind == "Q4_0":
        d = _f16(blocks[:, :2])[:, None]
        return _nibbles(blocks[:, 2:], 16), d, 8 * d, ()
    if kind == "Q5_0":
        high = (np.ascontiguousarray(blocks[:, 2:6]).view(np.uint32) >> np.arange(32, dtype=np.uint32)) & 1
        q = _nibbles(blocks[:, 6:], 16) | (high.astype(np.uint8) << 4)
        return q.astype(np.int8) - 16, _f16(blocks[:, :2])[:, None], None, ()
    if kind in ("Q4_K", "Q5_K"):
        d, dmin = _f16(blocks[:, 0:2])[:, None], _f16(blocks[:, 2:4])[:, None]
        sc, mn = _k_scales(blocks[:, 4:16])  # 6-bit, so int8 holds them
        if kind == "Q4_K":
            q = _nibbles(blocks[:, 16:], 32)
        else:
            high = (blocks[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1  # [B, 8, 32]
            q = _nibbles(blocks[:, 48:], 32) | (high.reshape(len(blocks), 256) << 4)
        return q, d, dmin, (sc, mn)
    if kind == "Q6_K":
        low = _nibbles(blocks[:, :128], 64)  # [B, 256]: two halves of 128, each 64 low then 64 high nibbles
        qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
        q = low | ((qh & 3).reshape(-1, 256) << 4)
        return q.astype(np.int8) - 32, _f16(blocks[:, 208:210])[:, None], None, (blocks[:, 192:208].view(np.int8),)
    raise AssertionError(kind)


# bits, group, weights per block, bytes per block
GGUF_TYPES = {"Q4_0": (4, 32, 32, 18), "Q5_0": (8, 32, 32, 22), "Q8_0": (8, 32, 32, 34),
              "Q4_K": (4, 32, 256, 144), "Q5_K": (8, 32, 256, 176), "Q6_K": (8, 16, 256, 210)}  # fmt: skip


def from_gguf(name: str, kind: str, raw: np.ndarray, k: int, rows_per_slice: int = 4096) -> QuantWeight:
    """Repack GGUF tensor ``name`` of type ``kind`` (its raw bytes [N, bytes per row]) of K = ``k`` columns."""
    if kind not in GGUF_TYPES:
        raise UnsupportedTensor(f"GGUF tensor {name!r} has type {kind}; the quantised kernel holds {sorted(GGUF_TYPES)}"
                                " (load with --dtype float32 to dequantise the file instead)")  # fmt: skip
    if k % CHUNK:
        raise UnsupportedTensor(f"GGUF tensor {name!r} has {k} columns, not a multiple of {CHUNK}; load with --dtype float32")
    bits, group, per_block, block_bytes = GGUF_TYPES[kind]
    n = raw.shape[0]
    parts = []
    for r in range(0, n, rows_per_slice):  # in slices: the decoded int16/float intermediates of a whole LM head are GBs
        blocks = np.asarray(raw[r : r + rows_per_slice]).reshape(-1, block_bytes)
        codes, scales, mins, subs = _decode(kind, blocks)
        rows = min(rows_per_slice, n - r)
        shaped = [None if a is None else a.reshape(rows, -1) for a in (scales, mins, *subs)]
        parts.append(_pack(codes.reshape(rows, k), *shaped[:2], bits, group, kind, *shaped[2:]))
    return parts[0] if len(parts) == 1 else stack(parts)


def quantize(weight: torch.Tensor, kind: str) -> QuantWeight:
    """Quantise float weights [N, K] in groups of 32: "int8" symmetric (scale max|w| / 127), "q4" 4-bit with a min
    (scale (max − min) / 15)."""
    if kind not in ("int8", "q4"):
        raise ValueError(f"kind must be 'int8' or 'q4', got {kind!r}")
    n, k = weight.shape
    if k % CHUNK:
        raise ValueError(f"weight has {k} columns; quantising needs a multiple of {CHUNK}")
    parts = []
    for r in range(0, n, 4096):  # in slices: a float32 copy of a whole LM head is half a GiB
        w = weight[r : r + 4096].to(torch.float32).reshape(-1, k // 32, 32)
        if kind == "int8":
            s = w.abs().amax(-1) / 127
            s = torch.where(s > 0, s, torch.ones_like(s))
            codes = torch.round(w / s[..., None]).clamp_(-127, 127)
            parts.append(_pack(codes.reshape(-1, k).numpy(), s.numpy(), None, 8, 32, kind))
        else:
            lo, hi = w.amin(-1), w.amax(-1)
            s = (hi - lo) / 15
            s = torch.where(s > 0, s, torch.ones_like(s))
            codes = torch.round((w - lo[..., None]) / s[..., None]).clamp_(0, 15)
            parts.append(_pack(codes.reshape(-1, k).to(torch.uint8).numpy(), s.numpy(), (-lo).numpy(), 4, 32, kind))
    return parts[0] if len(parts) == 1 else stack(parts)


# ---- the linear layer -----------------------------------------------------------------------------------------


def linear(x: torch.Tensor, weight: QuantWeight, bias: torch.Tensor | None = None, *, isa: str | None = None) -> torch.Tensor:
    """y[..., N] = x[..., K] · w^T + bias through the quantised kernel, float32, in slices of SLICE_ROWS rows.

    Each activation row is quantised to int8 per 128 columns (scale max|x| / 127); every group's sum is exact.
    ``isa`` forces a path (default: this process's, ``specdec.models.isa.ISA``).
    """
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must have {k} features to match weight [{n}, {k}], got shape {tuple(x.shape)}")
    path = isa_mod.code(isa)
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    y = torch.empty(x2.shape[0], n, dtype=torch.float32)
    b = 0 if bias is None else bias.to(torch.float32).contiguous().data_ptr()
    pointers = [0 if t is None else t.data_ptr() for t in weight.tensors()]
    x_at, y_at = x2.data_ptr(), y.data_ptr()  # float32: 4 bytes per element
    for r in range(0, x2.shape[0], SLICE_ROWS):
        rows = min(SLICE_ROWS, x2.shape[0] - r)
        _kernels.linear_quant(
            x_at + 4 * r * k, *pointers, weight.bits, weight.group, weight.block, b, y_at + 4 * r * n, rows, n, k, path,
        )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


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


def requantize(weight: QuantWeight, kind: str, rows_per_slice: int = 4096) -> QuantWeight:
    """``weight``'s values quantised again as ``kind`` (a cheaper draft from a GGUF file), a slice of rows at a time."""
    n = weight.shape[0]
    return stack([quantize(weight.dequantize(slice(r, r + rows_per_slice)), kind) for r in range(0, n, rows_per_slice)])


def quantize_model(model: torch.nn.Module, kind: str) -> int:
    """Quantise every linear layer of ``model`` as ``kind``: each nn.Linear whose width the kernel takes and each
    QuantLinear (requantised) becomes a QuantLinear of ``kind``; return how many. A float input embedding keeps its
    weights (a tied LM head gets its own quantised copy); a quantised one tied to the head stays tied to it, now as
    ``kind``, rather than holding a second copy of the table."""
    embedding = model.get_input_embeddings()
    tied = isinstance(embedding, QuantEmbedding) and embedding.codes is getattr(model.get_output_embeddings(), "codes", None)
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if isinstance(child, QuantLinear) or (isinstance(child, torch.nn.Linear) and child.in_features % CHUNK == 0)]  # fmt: skip
    for parent, name, child in targets:
        bias = None if child.bias is None else child.bias.detach()
        if isinstance(child, QuantLinear):
            weight = requantize(child.weight_q, kind)
        else:
            weight = quantize(child.weight.detach(), kind)
        setattr(parent, name, QuantLinear(weight, bias))
    if tied:
        model.set_input_embeddings(QuantEmbedding(model.get_output_embeddings().weight_q, embedding.dtype))
    return len(targets)
