"""One forward over ragged rows: each row has its own KV cache and its own number of new tokens.

Rows keep separate ``DynamicCache`` objects so that each can be cropped to its own accepted length. For
a forward, caches are left-padded to a common length and stacked, new tokens are right-padded to a
common width, and an attention mask plus per-row position ids keep every row's arithmetic its own:
padding is never attended to and never moves a position. Afterwards each row gets back a cache holding
exactly its cached and new tokens. The LM head runs only on the positions asked for.

Rows with nothing cached (new prompts) are instead packed end to end into one sequence, with a block-diagonal
causal mask and positions restarting at 0 per row: no padding, and one tall GEMM instead of many short ones.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel


@dataclass
class Row:
    cache: DynamicCache | None  # None: nothing cached yet (models/decoder.py's rows hold its KVCache instead)
    cached: int  # tokens in the cache
    new: list[int]  # tokens to feed
    want: list[int]  # indices into ``new`` whose next-token logits are needed


def forward(model: PreTrainedModel, rows: list[Row], vocab_size: int) -> tuple[list[DynamicCache], list[torch.Tensor]]:
    """Run ``model`` over ``rows``; return each row's updated cache and its logits [len(want), vocab_size]."""
    if len(rows) == 1:
        return _forward_one(model, rows[0], vocab_size)
    if all(r.cached == 0 for r in rows):
        return _forward_packed(model, rows, vocab_size)
    device = model.device
    width = max(len(r.new) for r in rows)
    past = max(r.cached for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), past + width, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.new)
        ids[i, :n] = torch.tensor(r.new)
        positions[i] = torch.arange(r.cached, r.cached + width)
        mask[i, past - r.cached : past + n] = 1
    cache = _stack([r.cache for r in rows], past) if past else None
    out = model.base_model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        past_key_values=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state
    gather = torch.tensor([i for i, r in enumerate(rows) for _ in r.want]), torch.tensor([j for r in rows for j in r.want])
    logits = model.get_output_embeddings()(hidden[gather])[:, :vocab_size]
    splits = logits.split([len(r.want) for r in rows])
    caches = _unstack(out.past_key_values, [(past - r.cached, past + len(r.new)) for r in rows])
    return caches, list(splits)


def _forward_one(model: PreTrainedModel, row: Row, vocab_size: int) -> tuple[list[DynamicCache], list[torch.Tensor]]:
    out = model.base_model(
        input_ids=torch.tensor([row.new], device=model.device),
        past_key_values=row.cache if row.cache is not None else DynamicCache(),
        use_cache=True,
    )
    logits = model.get_output_embeddings()(out.last_hidden_state[0, row.want])[:, :vocab_size]
    return [out.past_key_values], [logits]


def _forward_packed(model: PreTrainedModel, rows: list[Row], vocab_size: int) -> tuple[list[DynamicCache], list[torch.Tensor]]:
    lengths = [len(r.new) for r in rows]
    starts = list(itertools.accumulate(lengths, initial=0))[:-1]
    ids, positions, mask = _pack(rows)
    out = model.base_model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=positions.to(model.device),
        past_key_values=DynamicCache(),
        use_cache=True,
    )
    gather = torch.tensor([a + j for a, r in zip(starts, rows) for j in r.want], dtype=torch.long)
    logits = model.get_output_embeddings()(out.last_hidden_state[0, gather])[:, :vocab_size]
    caches = _unstack(out.past_key_values, [(a, a + n) for a, n in zip(starts, lengths)], packed=True)
    return caches, list(logits.split([len(r.want) for r in rows]))


def _pack(rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids [1, T] and positions [1, T] of the rows end to end, and the mask [1, 1, T, T] (True = attend) that lets
    each token see only the tokens of its own row up to itself."""
    lengths = torch.tensor([len(r.new) for r in rows])
    segment = torch.repeat_interleave(torch.arange(len(rows)), lengths)
    total = len(segment)
    mask = torch.ones(total, total, dtype=torch.bool).tril_() & (segment[:, None] == segment[None, :])
    positions = torch.cat([torch.arange(int(n)) for n in lengths])
    return torch.tensor([[t for r in rows for t in r.new]]), positions[None], mask[None, None]


def _stack(caches: list[DynamicCache | None], past: int) -> DynamicCache:
    legacy = [c.to_legacy_cache() if c is not None else None for c in caches]
    reference = next(c for c in legacy if c is not None)
    empty = tuple((k[:, :, :0], v[:, :, :0]) for k, v in reference)  # a row with nothing cached yet
    layers = []
    for per_row in zip(*(c if c is not None else empty for c in legacy)):
        keys = [_left_pad(k, past) for k, _ in per_row]
        values = [_left_pad(v, past) for _, v in per_row]
        layers.append((torch.cat(keys), torch.cat(values)))
    return DynamicCache.from_legacy_cache(tuple(layers))


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    """[1, heads, n, dim] → [1, heads, length, dim] with zeros in front (masked out)."""
    missing = length - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _unstack(cache: DynamicCache, spans: list[tuple[int, int]], packed: bool = False) -> list[DynamicCache]:
    """Row i's cache is batch row i (or batch row 0 when ``packed``), positions spans[i]."""
    legacy = cache.to_legacy_cache()
    batch_rows = [0] * len(spans) if packed else range(len(spans))
    return [
        DynamicCache.from_legacy_cache(tuple((k[i : i + 1, :, a:b], v[i : i + 1, :, a:b]) for k, v in legacy))
        for i, (a, b) in zip(batch_rows, spans)
    ]
