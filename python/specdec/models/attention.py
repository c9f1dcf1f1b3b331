"""transformers' SDPA attention, keeping grouped-query attention grouped when there is a mask (CPU only).

transformers' ``sdpa`` passes ``enable_gqa`` to torch only without an attention mask; with one (a verify over
k > 1 new tokens, or a ragged batch) it first copies every key and value head ``heads ÷ kv_heads`` times. On
Qwen2.5-1.5B (12 query heads, 2 kv heads) that copy was the largest torch cost a verify adds over a one-token
step: ``copy_`` went from 0.3 to 6.9 ms per forward at k = 5 with a 128-token context, and it grows with the
context. torch's CPU kernel takes the mask and the groups together. (On CUDA a mask with ``enable_gqa`` falls back
to the math kernel, so there transformers' choice stands.)

A few new tokens on a CPU (a verify, up to ``ROW_WISE_MAX``) attend one query at a time, each over the keys up to its
own position: torch's kernel blocks its reduction by the query length, so a query in a verify of k tokens would
otherwise get other bits than the same query decoded alone, and with int8-quantised activations downstream
(``specdec.models.quant``) such a difference can flip a greedy token. Row by row, a verify equals decode steps bit
for bit (``python bench/verify_cost.py`` checks it and times the cost).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "specdec_sdpa"
ROW_WISE_MAX = 32  # the small-M kernel's row limit: a verify or a short prefill chunk


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
    q, kv = query.shape[2], key.shape[-2]
    if query.device.type == "cpu" and 1 < q <= ROW_WISE_MAX and kv >= q and (is_causal or attention_mask is not None):
        rows = []
        for i in range(q):
            end = kv - q + i + 1  # this query's own position: it sees the keys up to it, as a decode step would
            mask = None if attention_mask is None else attention_mask[:, :, i : i + 1, :end]
            rows.append(F.scaled_dot_product_attention(
                query[:, :, i : i + 1], key[:, :, :end], value[:, :, :end], attn_mask=mask, dropout_p=dropout,
                scale=scaling, enable_gqa=key.shape[1] != query.shape[1]))  # fmt: skip
        return torch.cat(rows, dim=2).transpose(1, 2).contiguous(), None
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=is_causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(NAME, grouped_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the masks transformers builds for its own sdpa


def install(model: PreTrainedModel) -> bool:
    """Switch a CPU model that uses transformers' sdpa to ``grouped_sdpa``; return whether it was switched."""
    if model.device.type != "cpu" or model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
