"""The drafter that proposes nothing: target-only decoding through the same engine (the baseline)."""

from __future__ import annotations

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.sequence import Sequence


class NoDrafter(Drafter):
    proposes = False

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        return [Proposal([]) for _ in seqs]
