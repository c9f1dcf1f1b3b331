"""Drafters propose the next γ tokens of each sequence. One interface: ``propose(seqs, gammas)``.

- ``DraftModelDrafter`` runs the small model autoregressively on each sequence's own KV cache, batched
  across sequences (greedy or sampled; it returns its processed distributions q for the acceptance rule);
- ``NgramDrafter`` is prompt lookup: the longest recent n-gram that occurred earlier predicts what follows;
- ``NoDrafter`` proposes nothing, which makes the engine plain target-only decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from specdec import draft_decoder, kernels, ragged
from specdec.models import LoadedModel
from specdec.params import stack_filters
from specdec.policy import StepCosts

if TYPE_CHECKING:
    from specdec.engine import Sequence

# The draft samples from its own random stream: another Philox key than the target's.
DRAFT_SEED_SALT = 0x9E3779B97F4A7C15
OFFSETS_PER_STEP = 64
# A sequence with more tokens than this to catch up on (its prompt, after the prefill) drafts alone, so
# that one long row does not pad every other row of the batch to its length.
BATCH_CATCH_UP = 8


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None = None  # [γ, V] processed draft distributions; None means one-hot
    seconds: float = 0.0  # wall time of the draft forwards this sequence took part in


class Drafter(Protocol):
    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]: ...

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        """Forget everything after the first ``valid_len`` tokens of the sequence."""


class NoDrafter:
    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        return [Proposal([]) for _ in seqs]

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: match the last n tokens (n from n_max down to n_min) against earlier context."""

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"ngram sizes must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        return [Proposal(self.lookup(s.all_ids, g)) for s, g in zip(seqs, gammas)]

    def lookup(self, ids: list[int], gamma: int) -> list[int]:
        if gamma == 0:
            return []
        for n in range(min(self.n_max, len(ids) - 1), self.n_min - 1, -1):
            tail = ids[-n:]
            # The most recent earlier occurrence, not the suffix itself.
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    return ids[start + n : start + n + gamma]
        return []

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        pass


class DraftModelDrafter:
    """The small model proposes γ tokens per sequence, one batched forward per draft position.

    With ``lean`` (and a model it serves) the forwards run ``draft_decoder.DraftDecoder``, else transformers'.
    """

    def __init__(self, draft: LoadedModel, vocab_size: int, costs: StepCosts, *, lean: bool = True) -> None:
        self.model = draft.model
        self.vocab_size = vocab_size
        self.costs = costs
        self.decoder = draft_decoder.DraftDecoder(draft.model) if lean and draft_decoder.supports(draft.model) else None

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        out = [Proposal([]) for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        pending = [s.all_ids[s.draft_len :] for s in seqs]
        for j in range(max(gammas, default=0)):
            live = [i for i, g in enumerate(gammas) if g > j]
            alone = [[i] for i in live if len(pending[i]) > BATCH_CATCH_UP]
            together = [i for i in live if len(pending[i]) <= BATCH_CATCH_UP]
            for group in alone + ([together] if together else []):
                t0 = time.perf_counter()
                tokens, q = self._draft_one_position([seqs[i] for i in group], [pending[i] for i in group], j)
                seconds = time.perf_counter() - t0
                self.costs.record_draft(len(group) * max(len(pending[i]) for i in group), seconds)
                for i, tok, qi in zip(group, tokens, q):
                    out[i].tokens.append(tok)
                    out[i].seconds += seconds
                    qs[i].append(qi)
                    pending[i] = [tok]
        for s, p, q in zip(seqs, out, qs):
            # Only a sampled row needs q, and it has one at every position (its group is always sampled); a greedy
            # row may have drafted some positions beside a sampled row (q) and later ones without (None).
            p.q = torch.stack(q) if q and not s.request.sampling.greedy else None
        return out

    def _draft_one_position(
        self, seqs: list[Sequence], pending: list[list[int]], j: int
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        rows = [ragged.Row(s.draft_cache, s.draft_len, p, [len(p) - 1]) for s, p in zip(seqs, pending)]
        if self.decoder is not None:
            caches, logits = self.decoder.forward(rows, self.vocab_size)
        else:
            caches, logits = ragged.forward(self.model, rows, self.vocab_size)
        for s, c, p in zip(seqs, caches, pending):
            s.draft_cache, s.draft_len = c, s.draft_len + len(p)
        # q matters only to sampled rows: greedy ones are verified against argmax p alone.
        sampled = any(not s.request.sampling.greedy for s in seqs)
        result = kernels.sample(
            torch.cat(logits).cpu(),
            **stack_filters([s.request.sampling for s in seqs]),
            seed=np.array([s.seed ^ DRAFT_SEED_SALT for s in seqs], dtype=np.uint64),
            offset=np.array([s.step_index * OFFSETS_PER_STEP + j for s in seqs], dtype=np.uint64),
            return_probs=sampled,
        )
        tokens, q = result if sampled else (result, [None] * len(seqs))
        return [int(t) for t in tokens], list(torch.as_tensor(q)) if sampled else q

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        if seq.draft_cache is not None and seq.draft_len > valid_len:
            seq.draft_cache.crop(valid_len)
            seq.draft_len = valid_len
