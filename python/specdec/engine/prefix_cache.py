"""Prefix caching: the keys and values of prompts' whole blocks, shared across requests within a byte budget.

A block is ``quant.GEMM_ROWS`` aligned positions of a sequence. Its key hashes every token from the start of the
sequence to the block's end (a chain: each block's key hashes the previous key and its own tokens), the model it
belongs to and the request's scope (``key``: its ``speculation.cache_scope`` within its tenant's), so a hit is a
whole prefix of the same scope, never a block that merely looks alike.

Exactness: the lean forward computes a whole aligned block with a GEMM of its own and every other position with
the batch-invariant kernel (``decoder.RowPlan``), so a position's bits depend only on the tokens up to it and on
which of the two computed it. A forward that starts at a block boundary of a prefix computed that way (from
position 0 or from a hit) computes its whole blocks the same way a cold prefill would; only such blocks are
stored (``extend``), and a request that reuses them computes the bits it would compute without the cache.

Stored blocks are copies: a request copies its hit into its own KV cache, so eviction (least recently used first)
never touches a running request, and nothing needs releasing when a request ends.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from specdec.engine.sequence import Sequence
from specdec.models import quant
from specdec.models.decoder import KVCache

BLOCK = quant.GEMM_ROWS
# The default budget: a sixteenth of the machine's memory, at most this (the default pair keeps 56 + 24 KiB per
# prompt token, target and draft, so 2 GiB hold about 26,000 tokens of prompts).
DEFAULT_MAX_BYTES = 2 << 30


def default_budget() -> int:
    """A sixteenth of physical memory, at most DEFAULT_MAX_BYTES."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return min(DEFAULT_MAX_BYTES, memory // 16)


@dataclass(frozen=True)
class _Block:
    keys: torch.Tensor  # [layers, kv_heads, BLOCK, head_dim]
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


class PrefixCache:
    """Blocks of keys and values, least recently used first out, within ``budget_bytes`` (0: off).

    ``model`` in every call names whose cache a block belongs to (the target's and the draft's share the budget).
    Counters: ``queried_tokens`` and ``hit_tokens`` over ``load`` calls with ``count=True``; ``bytes`` held now.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0: off), got {budget_bytes}")
        self.budget = budget_bytes
        self.bytes = 0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self._blocks: OrderedDict[bytes, _Block] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def load(self, model: str, ids: list[int], limit: int, count: bool = False) -> tuple[KVCache | None, int]:
        """The longest cached prefix of ``ids[:limit]`` in whole blocks, copied into a new KV cache: (cache, its
        length), or (None, 0) on a miss."""
        if self.budget == 0:
            return None, 0
        if count:
            self.queried_tokens += max(0, limit)
        found: list[_Block] = []
        keys = _chain(model, ids, limit // BLOCK)
        for key in keys:
            block = self._blocks.get(key)
            if block is None:
                break
            found.append(block)
        if not found:
            return None, 0
        self._touch(keys[: len(found)])
        length = len(found) * BLOCK
        layers, heads, _, dim = found[0].keys.shape
        cache = KVCache(layers, heads, dim, capacity=max(64, length + BLOCK))
        for i, block in enumerate(found):
            cache.keys[:, :, i * BLOCK : (i + 1) * BLOCK] = block.keys
            cache.values[:, :, i * BLOCK : (i + 1) * BLOCK] = block.values
        cache.length = length
        if count:
            self.hit_tokens += length
        return cache, length

    def extend(self, model: str, ids: list[int], cache: KVCache, canonical: int, start: int, end: int) -> int:
        """After a forward wrote positions [start, end) of ``ids`` into ``cache``: where it began at ``canonical``
        (a block boundary up to which every position was computed as a cold prefill computes it), store its whole
        blocks not yet held and return the new such boundary; else return ``canonical`` unchanged."""
        if self.budget == 0 or start != canonical or start % BLOCK:
            return canonical
        upto = end - end % BLOCK
        keys = _chain(model, ids, upto // BLOCK)
        for i in range(start // BLOCK, len(keys)):
            if keys[i] not in self._blocks:
                a, b = i * BLOCK, (i + 1) * BLOCK
                block = _Block(cache.keys[:, :, a:b].clone(), cache.values[:, :, a:b].clone())
                self._blocks[keys[i]] = block
                self.bytes += block.nbytes
        self._touch(keys)
        while self.bytes > self.budget:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= old.nbytes
        return upto

    def _touch(self, keys: list[bytes]) -> None:
        """Mark a prefix's blocks used, its first block last: eviction then cuts prefixes from their ends, and a
        prefix never loses a block that later ones of it need."""
        for key in reversed(keys):
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Neither hits nor stores inside: a benchmark that runs the same prompt several ways times each cold."""
        budget, self.budget = self.budget, 0
        try:
            yield
        finally:
            self.budget = budget


def key(model: str, seq: Sequence) -> str:
    """The name a sequence's blocks are kept under: the model's, within the request's scope (``SpeculationParams.scope``:
    its cache_scope within its tenant's), so that requests of one scope never reuse (or learn by timing that someone
    sent) another scope's prompts."""
    return f"{model}/{seq.request.speculation.scope}"


def _chain(model: str, ids: list[int], blocks: int) -> list[bytes]:
    """Keys of the first ``blocks`` blocks of ``ids``: each hashes the previous key and the block's token ids."""
    keys, key = [], hashlib.blake2b(model.encode(), digest_size=16).digest()
    arr = np.asarray(ids[: blocks * BLOCK], dtype=np.int64)
    for i in range(blocks):
        key = hashlib.blake2b(key + arr[i * BLOCK : (i + 1) * BLOCK].tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys
