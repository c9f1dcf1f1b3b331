"""The one interface the engine uses for drafters, and what a drafter returns.

A drafter proposes the next γ tokens of each of its sequences. Anything it keeps per sequence (a draft model's
KV cache) lives in ``seq.draft_state``, which only the drafter reads or writes; the engine asks it to forget
tokens (``rollback``) or everything (``release``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from specdec.engine.sequence import Sequence


@dataclass
class Proposal:
    tokens: list[int]
    q: torch.Tensor | None = None  # [γ, V] processed draft distributions; None means one-hot
    seconds: float = 0.0  # wall time of the draft forwards this sequence took part in
    dropped: int = 0  # drafted tokens cut off because the response format forbids them (counted as rejected)
    # Positions of tokens the response format allows alone (jump-forward): proposed without drafting, certain to be
    # accepted, and left out of the drafter's acceptance statistics.
    forced: list[int] = field(default_factory=list)


class Drafter(ABC):
    """Proposes draft tokens; the engine verifies them.

    ``proposes`` is False for a drafter that never drafts (target-only decoding: γ is always 0).
    ``runs_model`` is True when drafting costs model forwards: the engine then chooses one γ for all of its rows
    in a batch from the measured draft and target costs; a model-free drafter's γ depends on α alone.
    ``runs_model_for`` says it per sequence and step, for a drafter that decides each step (the hybrid).
    """

    proposes: bool = True
    runs_model: bool = False

    def runs_model_for(self, seq: Sequence) -> bool:
        """Whether drafting for ``seq`` this step costs model forwards."""
        return self.runs_model

    @abstractmethod
    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        """Up to ``gammas[i]`` tokens for ``seqs[i]``, each sequence's all in one batched call."""

    def pending(self, seq: Sequence) -> int:
        """Tokens of ``seq.all_ids`` that the drafter must still read before it can draft (0 for model-free ones)."""
        return 0

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        """Forget everything after the first ``valid_len`` tokens of the sequence."""

    def release(self, seq: Sequence) -> None:
        """Free whatever the drafter holds for the sequence."""
        seq.draft_state = None
