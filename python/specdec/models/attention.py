"""transformers' SDPA attention, keeping grouped-query attention grouped when there is a mask (CPU only).

transformers' ``sdpa`` passes ``enable_gqa`` to torch only without an attention mask; with one (a verify over
k > 1 new tokens, or a ragged batch) it first copies every key and value head ``heads ÷ kv_heads`` times. On
Qwen2.5-1.5B (12 query heads, 2 kv heads) that copy was the largest torch cost a verify adds over a one-token
step: ``copy_`` went from 0.3 to 6.9 ms per forward at k = 5 with a 128-token context, and it grows with the
context. torch's CPU kernel takes the mask and the groups together. (On CUDA a mask with ``enable_gqa`` falls back
to the math kernel, so there transformers' choice stands.)

On a CPU every sequence attends on its own, over exactly its own keys, so that its bits do not depend on what
else is in the batch: torch's kernel blocks its reductions by the query and key lengths, so a query in a verify of
k tokens, or beside a padded neighbour, or packed with another prompt, would otherwise get other bits than the
same query alone, and with int8-quantised activations downstream (``specdec.models.quant``) such a difference can
flip a greedy token. Per sequence, the queries split into runs that share their first key (one prompt of a packed
prefill, or the new tokens of one row): a run of more than ``ROW_WISE_MAX`` queries with no cached keys before it (a
prefill) attends in one causal call, as a prompt alone does; any other run one query at a time, each over the keys
up to its own position: a decode step's query or a verify's (at most ``ATTEND_ROWS_MAX``) through ``attend_rows``,
in one kernel call for the run, and a longer run through torch's kernel a query at a time. So a verify equals
decode steps, and a request's tokens do not depend on its neighbours (``python bench/verify_cost.py`` and
``specdec loadtest`` check both). The lean forward's prompt chunks go through ``attend_prompt`` instead: a masked
call per whole aligned block of positions, the rest by the rules above, so that a position's bits do not depend on
where its chunk began either.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from specdec import _kernels
from specdec.models import isa
from specdec.types import GAMMA_LIMIT

NAME = "specdec_sdpa"
ROW_WISE_MAX = 32  # the small-M kernel's row limit: a verify or a short prefill chunk
# The longest run attend_rows takes: every verify (γ + 1 tokens). Its scalar softmax and per-head reads cost more
# than torch's kernel over a long prefill chunk's thousands of keys (`python bench/long_prompt.py` times it).
ATTEND_ROWS_MAX = GAMMA_LIMIT + 1


def grouped_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, q, D], key/value [B, H_kv, kv, D], mask [B, 1, q, ≥kv] or None → ([B, q, H, D], None)."""
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    if query.device.type == "cpu" and (attention_mask is not None or is_causal or query.shape[2] == 1):
        return _per_sequence(query, key, value, attention_mask, dropout, scaling), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def _per_sequence(query, key, value, mask, dropout: float, scaling: float | None) -> torch.Tensor:
    """Causal attention of each sequence over its own keys (see the module docstring) → [B, q, H, D]."""
    b_size, heads, q, _ = query.shape
    kv = key.shape[-2]
    if mask is None:  # causal with the new tokens last: query i sees keys [0, kv - q + i]
        spans = torch.stack([torch.zeros(q, dtype=torch.long), torch.arange(kv - q + 1, kv + 1)], 1).expand(b_size, q, 2)
    else:
        allowed = (mask if mask.dtype == torch.bool else mask == 0)[:, 0]  # [B, q, kv]
        first = torch.where(allowed.any(-1), allowed.int().argmax(-1), 0)
        last = kv - allowed.flip(-1).int().argmax(-1)
        spans = torch.stack([first, torch.where(allowed.any(-1), last, 0)], -1)  # [B, q, 2]: keys [start, end)
    out = query.new_zeros(b_size, heads, q, query.shape[-1])
    for b in range(b_size):
        rows = spans[b].tolist()
        i = 0
        while i < q:
            start, end = rows[i]
            j = i + 1
            while j < q and rows[j][0] == start and rows[j][1] == rows[j - 1][1] + 1:
                j += 1
            if end > start:  # else a padding query: it attends to nothing
                attend_run(query[b, :, i:j], key[b], value[b], start, end, scaling, out[b, :, i:j], dropout)
            i = j
    return out.transpose(1, 2).contiguous()


def attend_run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, start: int, first_end: int,
               scale: float | None, out: torch.Tensor, dropout: float = 0.0) -> None:
    """A run of consecutive queries of one sequence: query i attends keys [start, first_end + i), by the rule of the
    module docstring, so that each query gets the bits it would get alone.

    query, out [H, n, D] and key, value [H_kv, L, D] (L ≥ first_end + n - 1); writes ``out``.
    """
    n = query.shape[1]
    gqa = key.shape[0] != query.shape[0]
    attend = lambda i0, i1, k0, k1, causal: F.scaled_dot_product_attention(  # noqa: E731
        query[None, :, i0:i1], key[None, :, k0:k1], value[None, :, k0:k1], dropout_p=dropout, scale=scale,
        is_causal=causal, enable_gqa=gqa)[0]  # fmt: skip
    kernel = dropout == 0.0 and all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in (query, key, value))
    if n > ROW_WISE_MAX and first_end - start == 1:  # a prompt from its first token: one causal call
        out.copy_(attend(0, n, start, first_end + n - 1, True))
    elif kernel and not prompt_run(n, first_end - start - 1):
        ends = np.arange(first_end, first_end + n, dtype=np.int64)
        attend_rows(query, key, value, np.full_like(ends, start), ends, scale, out)
    else:
        for r in range(n):
            out[:, r : r + 1] = attend(r, r + 1, start, first_end + r, False)


def attend_prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cached: int, block: int,
                  scale: float | None, out: torch.Tensor) -> None:
    """A prompt chunk of one sequence: its n queries at positions [cached, cached + n), each attending the keys up to
    its own position. Each whole aligned block of ``block`` positions attends in one masked call of its own, the
    other positions (a tail, or a head before the first block boundary) through ``attend_run``; so a position's bits
    do not depend on where its chunk began, as long as chunks begin at block boundaries (what a cached prefix relies
    on, beside ``decoder.RowPlan``).

    query, out [H, n, D] and key, value [H_kv, L, D] (L ≥ cached + n); writes ``out``.
    """
    end = cached + query.shape[1]
    first, last = -(-cached // block) * block, end // block * block
    if first >= last:  # no whole block: the run as before
        attend_run(query, key, value, 0, cached + 1, scale, out)
        return
    gqa = key.shape[0] != query.shape[0]
    for b in range(first, last, block):
        i = b - cached
        mask = torch.ones(block, b + block, dtype=torch.bool).tril(b)  # query b + r sees keys [0, b + r]
        out[:, i : i + block] = F.scaled_dot_product_attention(
            query[None, :, i : i + block], key[None, :, : b + block], value[None, :, : b + block], attn_mask=mask,
            scale=scale, enable_gqa=gqa)[0]  # fmt: skip
    for lo, hi in ((cached, first), (last, end)):  # the head before the first block, the tail after the last
        if hi > lo:
            attend_run(query[:, lo - cached : hi - cached], key, value, 0, lo + 1, scale, out[:, lo - cached : hi - cached])


def prompt_run(n: int, cached: int) -> bool:
    """Whether a run of ``n`` queries after ``cached`` keys is past attend_rows: a prompt (one causal call) or
    longer than ATTEND_ROWS_MAX (a query at a time)."""
    return (n > ROW_WISE_MAX and cached == 0) or n > ATTEND_ROWS_MAX


def attend_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, begin: ArrayLike, end: ArrayLike,
                scale: float | None, out: torch.Tensor) -> torch.Tensor:
    """Each query row alone over its own keys (csrc/attention/rows.hpp), on this process's kernel path.

    query, out [H, n, D] and key, value [H_kv, L, D]: float32 with contiguous last dims (strided views allowed);
    begin, end [n] integers (a tensor or an array): row r attends keys [begin[r], end[r]). Writes and returns ``out``.
    """
    heads, n, dim = query.shape
    if key.shape[0] == 0 or heads % key.shape[0] or out.shape != query.shape:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and out {tuple(out.shape)} do not fit")
    begin, end = np.ascontiguousarray(begin, dtype=np.int64), np.ascontiguousarray(end, dtype=np.int64)
    _kernels.attend_rows(
        query.data_ptr(), query.stride(0), query.stride(1), key.data_ptr(), key.stride(0), key.stride(1),
        value.data_ptr(), value.stride(0), value.stride(1), n, heads, key.shape[0], dim, begin.ctypes.data,
        end.ctypes.data, dim**-0.5 if scale is None else scale, out.data_ptr(), out.stride(0), out.stride(1),
        isa.code(isa.ISA or "portable"),
    )  # fmt: skip
    return out


AttentionInterface.register(NAME, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds for its own sdpa


def install(model: PreTrainedModel) -> bool:
    """Switch a CPU model that uses transformers' sdpa to ``grouped_sdpa``; return whether it was switched."""
    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
