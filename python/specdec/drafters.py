"""Drafters propose the next γ tokens of a sequence. One interface: ``propose(seq, gamma)``.

- ``DraftModelDrafter`` runs the small model autoregressively on its own KV cache (greedy or sampled, in
  which case it also returns its processed distributions q for the acceptance rule);
- ``NgramDrafter`` is prompt lookup: the longest recent n-gram that occurred earlier predicts what follows;
- ``NoDrafter`` proposes nothing, which makes the engine plain target-only decoding.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from specdec import kernels
from specdec.models import LoadedModel

if TYPE_CHECKING:
    from specdec.engine import Sequence

# The draft samples from its own random stream: another Philox key than the target's.
DRAFT_SEED_SALT = 0x9E3779B97F4A7C15
OFFSETS_PER_STEP = 64


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None  # [γ, V] processed draft distributions, or None for one-hot proposals
    seconds: float = 0.0  # draft forward time spent


class Drafter(Protocol):
    def propose(self, seq: Sequence, gamma: int) -> Proposal: ...

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        """Forget everything after the first ``valid_len`` tokens of the sequence."""


class NoDrafter:
    def propose(self, seq: Sequence, gamma: int) -> Proposal:
        return Proposal([], None)

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        pass


class NgramDrafter:
    """Prompt lookup: match the last n tokens (n from n_max down to n_min) against earlier context."""

    def __init__(self, n_min: int = 1, n_max: int = 4) -> None:
        if not 1 <= n_min <= n_max:
            raise ValueError(f"ngram sizes must satisfy 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max

    def propose(self, seq: Sequence, gamma: int) -> Proposal:
        ids = seq.all_ids
        for n in range(min(self.n_max, len(ids) - 1), self.n_min - 1, -1):
            tail = ids[-n:]
            # The most recent earlier occurrence, not the suffix itself.
            for start in range(len(ids) - n - 1, -1, -1):
                if ids[start : start + n] == tail:
                    follow = ids[start + n : start + n + gamma]
                    return Proposal(follow, None)
        return Proposal([], None)

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        pass


class DraftModelDrafter:
    """The small model proposes γ tokens, one forward each, computing the LM head only at the last position."""

    def __init__(self, draft: LoadedModel, vocab_size: int) -> None:
        self.model = draft.model
        self.device = draft.device
        self.vocab_size = vocab_size

    def propose(self, seq: Sequence, gamma: int) -> Proposal:
        if gamma == 0:
            return Proposal([], None)
        sampling = seq.request.sampling
        pending = seq.all_ids[seq.draft_len :]
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        seconds = 0.0
        for i in range(gamma):
            t0 = time.perf_counter()
            out = self.model(
                input_ids=torch.tensor([pending], device=self.device),
                past_key_values=seq.draft_cache,
                use_cache=True,
                logits_to_keep=1,
            )
            seq.draft_cache = out.past_key_values
            seq.draft_len += len(pending)
            logits = out.logits[0, -1:, : self.vocab_size].cpu()
            seconds += time.perf_counter() - t0
            seed, offset = seq.seed ^ DRAFT_SEED_SALT, seq.step_index * OFFSETS_PER_STEP + i
            if sampling.greedy:
                tok = int(kernels.sample(logits, **sampling.filters(), seed=seed, offset=offset)[0])
            else:
                tok_arr, q = kernels.sample(logits, **sampling.filters(), seed=seed, offset=offset, return_probs=True)
                tok = int(tok_arr[0])
                qs.append(torch.as_tensor(q[0]))
            tokens.append(tok)
            pending = [tok]
        return Proposal(tokens, torch.stack(qs) if qs else None, seconds)

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        if seq.draft_cache is not None and seq.draft_len > valid_len:
            seq.draft_cache.crop(valid_len)
            seq.draft_len = valid_len
