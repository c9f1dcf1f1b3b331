"""Prompt lookup: the longest recent n-gram that occurred earlier in the context predicts what follows."""

from __future__ import annotations

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.sequence import Sequence


class NgramDrafter(Drafter):
    """Match the last n tokens (n from n_max down to n_min) against earlier context."""

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
