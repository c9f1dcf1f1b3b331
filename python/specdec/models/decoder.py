"""A lean forward for Llama-family decoders on a CPU: transformers' function, with less around it.

transformers' forward spends a large share of a decode step in Python and small torch ops (masks, cache objects,
module dispatch), beside the time that streaming the weights takes; at the few rows of a decode step on a CPU
that is a large share of the step (`python bench/verify_cost.py` times both forwards). ``Decoder`` serves the target and the draft:

- q/k/v fused into one linear and gate/up into another where their layouts allow: one kernel call each, the
  activations quantised once.
  The model's own modules are re-pointed at views of the fused weights, so nothing is held twice;
- one KV cache per sequence, preallocated, grown by doubling and cropped by moving its length;
- ragged rows without padding: the linear layers take every row's new tokens at once, and each row attends on its
  own cache through ``attention.attend_run``, so a row's bits do not depend on its neighbours and a verify of k
  tokens equals k decode steps (with the small-M kernels' batch invariance);
- a prompt's positions in whole aligned blocks of ``quant.GEMM_ROWS`` (``RowPlan``) multiply each linear by a GEMM
  per block, quantised weights dequantised a tile at a time (``quant.Bound.gemm``, bfloat16 where the CPU has it),
  where the kernel's per-row work would bound it; every other row takes the kernel. No row's bits depend on what
  it is batched with or on where its prompt's chunks began, so a cached prefix holds the bits a cold prefill
  computes;
- float32 activations, the small-M kernel's input and output type;
- optionally a reduced vocabulary (``vocab``, for a draft, as FR-Spec and EAGLE-3 do): the LM head scores only
  those ids and every other id gets probability 0. The target decides every token, so the output is unchanged;
  only the acceptance rate can drop, while the head, a large share of a small draft's bytes, shrinks.

It computes the same function as transformers' forward (tested against its logits); a one-token step gives the
same bits as transformers' forward with ``attention.install``. It serves Llama-family decoders (``supports``):
RMSNorm, rotary positions, grouped-query attention, SwiGLU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from specdec import _kernels
from specdec.models import attention, isa, linear
from specdec.models import quant
from specdec.models import ragged

ARCHITECTURES = frozenset({"llama", "qwen2"})
# The logit of an id outside a reduced draft vocabulary: no probability at any temperature, yet finite, since the
# sampling kernels refuse non-finite logits, and finite still once divided by any temperature above 1e-8 (the
# lowest float would overflow to −inf there and poison a chunk's sum).
EXCLUDED_LOGIT = -1e30


def supports(model: PreTrainedModel) -> bool:
    """Whether ``Decoder`` computes this model's forward: a CPU Llama-family decoder with full attention, on a CPU
    with a small-M kernel path (elsewhere transformers' forward runs torch's GEMM)."""
    c = model.config
    return (
        model.device.type == "cpu"
        and isa.ISA is not None
        and c.model_type in ARCHITECTURES
        and getattr(c, "hidden_act", "silu") == "silu"
        and not getattr(c, "use_sliding_window", False)
        and hasattr(getattr(model.model, "rotary_emb", None), "inv_freq")
    )


class KVCache:
    """One sequence's keys and values for every layer, float32 [layers, kv_heads, capacity, head_dim] each.

    The first ``length`` positions are valid; ``crop`` forgets the rest without freeing anything.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int = 64) -> None:
        self.keys = torch.zeros(layers, kv_heads, capacity, head_dim)
        self.values = torch.zeros(layers, kv_heads, capacity, head_dim)
        self.length = 0

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions, doubling the capacity as often as needed."""
        capacity = self.keys.shape[2]
        if length <= capacity:
            return
        while capacity < length:
            capacity *= 2
        grown = [t.new_zeros(t.shape[0], t.shape[1], capacity, t.shape[3]) for t in (self.keys, self.values)]
        for new, old in zip(grown, (self.keys, self.values)):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.keys, self.values = grown

    def crop(self, length: int) -> None:
        self.length = min(self.length, length)


@dataclass
class _Linear:
    """A linear layer's operands: y [T, N] = x [T, K] · weight^T + bias, float32 in and out."""

    weight: torch.Tensor | quant.QuantWeight  # float [N, K], or quantised
    bias: torch.Tensor | None  # float32 [N]

    def __post_init__(self) -> None:
        self._quantised = quant.Bound(self.weight, self.bias) if isinstance(self.weight, quant.QuantWeight) else None

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Linear:
        bias = None if module.bias is None else module.bias.detach().to(torch.float32)
        if isinstance(module, quant.QuantLinear):
            return cls(module.weight_q, bias)
        return cls(module.weight.detach(), bias)

    def __call__(self, x: torch.Tensor, plan: RowPlan | None = None) -> torch.Tensor:
        """x [T, K] float32 → [T, N] float32: the blocks of ``plan`` through a GEMM each (whose bits depend on its
        rows alone), its other rows through the batch-invariant kernel. Without a plan: quantised weights through
        the kernel; float ones through the kernel up to linear.MAX_ROWS rows, else one GEMM (an LM head scoring a
        whole text)."""
        if plan is None or not plan.blocks:
            if plan is not None or self._quantised is not None or x.shape[0] <= linear.MAX_ROWS:
                return self._kernel(x)
            return self._float_gemm(x)
        out = torch.empty(x.shape[0], self.weight.shape[0], dtype=torch.float32)
        if len(plan.kernel):
            out[plan.kernel] = self._kernel(x[plan.kernel])
        if self._quantised is not None:
            self._quantised.gemm(x, plan.blocks, out)
        else:
            for a, b in plan.blocks:
                out[a:b] = self._float_gemm(x[a:b])
        return out

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self._quantised is not None:
            return self._quantised.kernel(x)
        return linear.linear(x, self.weight, self.bias)

    def _float_gemm(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.weight.dtype)
        return F.linear(x.to(self.weight.dtype), self.weight, bias).to(torch.float32)


@dataclass(frozen=True)
class RowPlan:
    """How a forward's rows of activations [T, ·] meet the linear layers: ``blocks`` are (start, end) row spans, each
    a whole aligned block of quant.GEMM_ROWS positions of one sequence, each multiplied by a GEMM of its own;
    ``kernel`` [T − rows in blocks] int64 indexes every other row, which takes the batch-invariant kernel. A row's
    bits thus depend on its own sequence's tokens alone, not on its batch or on how a prompt was chunked."""

    kernel: torch.Tensor
    blocks: list[tuple[int, int]]

    @classmethod
    def of(cls, rows: list[ragged.Row], spans: list[tuple[int, int]]) -> RowPlan:
        size = quant.GEMM_ROWS
        blocks = []
        for r, (a, _) in zip(rows, spans):
            first = -(-r.cached // size) * size  # the first block boundary at or after the row's first new position
            for p in range(first, r.cached + len(r.new) - size + 1, size):
                blocks.append((a + p - r.cached, a + p - r.cached + size))
        total = spans[-1][1] if spans else 0
        if not blocks:
            return cls(torch.arange(total), [])
        outside = torch.ones(total, dtype=torch.bool)
        for a, b in blocks:
            outside[a:b] = False
        return cls(outside.nonzero().squeeze(1), blocks)


@dataclass
class _Stack:
    """Linear layers that cannot be fused (different quantised layouts) run one by one, outputs side by side."""

    parts: list[_Linear]

    def __call__(self, x: torch.Tensor, plan: RowPlan | None = None) -> torch.Tensor:
        return torch.cat([p(x, plan) for p in self.parts], dim=-1)


def _fuse(modules: list[torch.nn.Module]) -> _Linear | _Stack:
    """One linear computing ``modules`` side by side (outputs concatenated). Each module's weight becomes a view of
    the fused one, so the model's own forward still works and nothing is held twice. Quantised weights of different
    layouts (a GGUF file may mix Q4_K and Q6_K in one layer) stay apart."""
    parts = [_Linear.of(m) for m in modules]
    quantised = [isinstance(p.weight, quant.QuantWeight) for p in parts]
    if any(quantised) and (not all(quantised) or len({p.weight.layout() for p in parts}) > 1):
        return _Stack(parts)
    sizes = [p.weight.shape[0] for p in parts]
    bias = None
    if any(p.bias is not None for p in parts):
        bias = torch.cat([torch.zeros(n) if p.bias is None else p.bias for p, n in zip(parts, sizes)])
    if all(quantised):
        weight = quant.stack([p.weight for p in parts])
        for m, (a, b) in zip(modules, _spans(sizes)):
            m.weight_q = weight.rows(slice(a, b))
        return _Linear(weight, bias)
    weight = torch.cat([p.weight for p in parts])
    for m, (a, b) in zip(modules, _spans(sizes)):
        m.weight = torch.nn.Parameter(weight[a:b], requires_grad=False)
    return _Linear(weight, bias)


@dataclass
class _Layer:
    input_norm: torch.Tensor  # float32 [hidden]
    qkv: _Linear | _Stack
    o: _Linear
    post_norm: torch.Tensor
    gate_up: _Linear | _Stack
    down: _Linear


class Decoder:
    """``forward(rows)`` over ``ragged.Row``s whose caches are ``KVCache``s (None: a new sequence)."""

    def __init__(self, model: PreTrainedModel, vocab: torch.Tensor | None = None) -> None:
        """``vocab``: the sorted ids the head scores (None: all)."""
        c = model.config
        if not supports(model):
            raise ValueError(f"the lean forward does not serve model_type {c.model_type!r} on {model.device}")
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.embed = model.get_input_embeddings()
        self.layers = [
            _Layer(
                input_norm=layer.input_layernorm.weight.detach().to(torch.float32),
                qkv=_fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                o=_Linear.of(layer.self_attn.o_proj),
                post_norm=layer.post_attention_layernorm.weight.detach().to(torch.float32),
                gate_up=_fuse([layer.mlp.gate_proj, layer.mlp.up_proj]),
                down=_Linear.of(layer.mlp.down_proj),
            )
            for layer in model.model.layers
        ]
        self.norm = model.model.norm.weight.detach().to(torch.float32)
        self.head = _Linear.of(model.get_output_embeddings())
        self.vocab = vocab
        if vocab is not None:
            w = self.head.weight
            rows = w.rows(vocab) if isinstance(w, quant.QuantWeight) else w[vocab].contiguous()
            self.head = _Linear(rows, None if self.head.bias is None else self.head.bias[vocab])
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().to(torch.float32)
        self.rope_scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = self.sin = torch.empty(0, self.head_dim)

    def forward(self, rows: list[ragged.Row], vocab_size: int) -> tuple[list[KVCache], list[torch.Tensor]]:
        """Run the rows; return each row's cache (holding its cached and new tokens) and its logits
        [len(want), vocab_size] float32 for the positions it wants."""
        caches = [r.cache if r.cache is not None else KVCache(len(self.layers), self.kv_heads, self.head_dim)
                  for r in rows]  # fmt: skip
        for r, cache in zip(rows, caches):
            if cache.length < r.cached:
                raise ValueError(f"a row claims {r.cached} cached tokens but its cache holds {cache.length}")
            cache.crop(r.cached)
            cache.reserve(r.cached + len(r.new))
        positions = torch.cat([torch.arange(r.cached, r.cached + len(r.new)) for r in rows])
        self._grow_rotary(int(positions.max()) + 1)
        x = self.embed(torch.tensor([t for r in rows for t in r.new])).to(torch.float32).contiguous()  # [T, hidden]
        spans = _spans([len(r.new) for r in rows])
        plan = RowPlan.of(rows, spans)
        # A decode or verify row's queries each attend to the keys up to their own position (attention.attend_run's
        # rule, which attend_rows applies, with the key spans built once for all layers); the rest go through
        # attend_run itself.
        key_spans = [None if attention.prompt_run(len(r.new), r.cached)
                     else (np.zeros(len(r.new), np.int64), np.arange(r.cached + 1, r.cached + 1 + len(r.new), dtype=np.int64))
                     for r in rows]  # fmt: skip
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(self._rms(x, layer.input_norm), plan)
            _rope(qkv, self.heads + self.kv_heads, self.head_dim, positions, self.cos, self.sin)
            x += layer.o(self._attention(i, qkv, rows, caches, spans, key_spans), plan)
            x += layer.down(_silu_mul(layer.gate_up(self._rms(x, layer.post_norm), plan)), plan)
        for r, cache in zip(rows, caches):
            cache.length = r.cached + len(r.new)
        want = torch.tensor([a + j for (a, _), r in zip(spans, rows) for j in r.want], dtype=torch.long)
        logits = self.head(self._rms(x[want], self.norm))
        if self.vocab is not None:
            full = logits.new_full((logits.shape[0], max(vocab_size, int(self.vocab[-1]) + 1)), EXCLUDED_LOGIT)
            full[:, self.vocab] = logits
            logits = full
        logits = logits[:, :vocab_size]
        return caches, list(logits.split([len(r.want) for r in rows]))

    def _attention(self, layer: int, qkv, rows, caches, spans, key_spans) -> torch.Tensor:
        """qkv [T, (heads + 2 kv_heads) · head_dim], q and k rotated → attention output [T, heads · head_dim];
        writes the keys and values of the new tokens into each row's cache. ``key_spans``: per row, None (a prompt
        run for attend_run) or the (begin, end) key arrays attend_rows takes, the same for every layer."""
        h, kv, d = self.heads, self.kv_heads, self.head_dim
        qkv = qkv.view(-1, h + 2 * kv, d)
        out = qkv.new_empty(h, qkv.shape[0], d)
        for r, cache, (a, b), keys in zip(rows, caches, spans, key_spans):
            end = r.cached + len(r.new)
            cache.keys[layer, :, r.cached : end] = qkv[a:b, h : h + kv].transpose(0, 1)
            cache.values[layer, :, r.cached : end] = qkv[a:b, h + kv :].transpose(0, 1)
            query = qkv[a:b, :h].transpose(0, 1)
            if keys is None:
                attention.attend_prompt(query, cache.keys[layer], cache.values[layer], r.cached, quant.GEMM_ROWS, None,
                                        out[:, a:b])  # fmt: skip
            else:
                attention.attend_rows(query, cache.keys[layer], cache.values[layer], *keys, None, out[:, a:b])
        return out.transpose(0, 1).reshape(-1, h * d)

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm of x [T, hidden] (contiguous float32) → a new [T, hidden]."""
        out = torch.empty_like(x)
        _kernels.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], self.eps)
        return out

    def _grow_rotary(self, need: int) -> None:
        """cos, sin [≥ need, head_dim] (the rotary scaling included), grown by doubling."""
        if need > self.cos.shape[0]:
            size = max(need, 2 * self.cos.shape[0], 256)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq)
            angles = torch.cat([freqs, freqs], dim=-1)
            self.cos = (angles.cos() * self.rope_scale).contiguous()
            self.sin = (angles.sin() * self.rope_scale).contiguous()


def frequent_ids(tokenizer, size: int) -> torch.Tensor:
    """The ids a reduced draft vocabulary keeps: the ``size`` lowest ids (a byte-level BPE vocabulary lists its bytes
    first and then its merges in the order they were learned, most frequent first) and every special or added token
    (chat markers, end of text). Sorted, int64."""
    keep = set(range(min(size, len(tokenizer))))
    keep |= set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())
    return torch.tensor(sorted(keep), dtype=torch.long)


def _rope(qkv: torch.Tensor, heads: int, dim: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary positions, the half-split convention of Llama-family checkpoints, in place on the first ``heads``
    heads of each row of qkv [T, ≥ heads · dim] (q and k rotate by the same positions)."""
    _kernels.rope(qkv.data_ptr(), qkv.shape[0], heads, dim, qkv.stride(0), positions.data_ptr(), cos.data_ptr(), sin.data_ptr())


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: [T, 2 · inter] (gate, then up) → silu(gate) · up [T, inter]."""
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    _kernels.silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], out.shape[1])
    return out


def _spans(lengths: list[int]) -> list[tuple[int, int]]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(a, a + n) for a, n in zip(starts, lengths)]
