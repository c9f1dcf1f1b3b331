"""The hybrid drafter (METHOD_AUTO): suffix drafting where earlier text continues the context with confidence, the
draft model elsewhere, decided per sequence and step.

A step for which the suffix index offers at least ``MIN_SUFFIX_TOKENS`` drafts costs no model forward, and the
engine's γ policy treats it as a model-free drafter's (γ from α alone, ``runs_model_for``); any other step runs
the draft model, which first reads the tokens the suffix steps emitted (its catch-up). Both sub-drafters keep their
own per-sequence state; the hybrid holds the two side by side in ``seq.draft_state`` and hands each its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.drafters.draft_model import DraftModelDrafter
from specdec.engine.drafters.suffix import SuffixDrafter
from specdec.engine.sequence import Sequence

# Suffix drafts a step needs before it skips the draft model. Short matches on ordinary prompts are often common
# n-grams whose continuation the model drafts better; a re-sent conversation's matches run long either way
# (`specdec bench --method auto` against `--method draft` on the built-in prompts, and `--scenario agent-loop`).
MIN_SUFFIX_TOKENS = 4
# How far a suffix lookup looks ahead when deciding (the engine then caps it at the step's γ).
LOOKAHEAD = 8


@dataclass
class _Both:
    suffix: Any = None
    model: Any = None
    lookup: tuple[int, int, list[int]] | None = None  # (context length, limit, drafts): asked twice a step


class HybridDrafter(Drafter):
    runs_model = True

    def __init__(self, suffix: SuffixDrafter, model: DraftModelDrafter) -> None:
        self.suffix, self.model = suffix, model

    def _call(self, which: str, seqs: list[Sequence], fn):
        """Run ``fn`` with each sequence's ``draft_state`` set to its state for sub-drafter ``which``."""
        states = []
        for s in seqs:
            both = s.draft_state if s.draft_state is not None else _Both()
            states.append(both)
            s.draft_state = getattr(both, which)
        try:
            return fn()
        finally:
            for s, both in zip(seqs, states):
                setattr(both, which, s.draft_state)
                s.draft_state = both

    def _suffix_draft(self, seq: Sequence, limit: int) -> list[int]:
        """The suffix drafts for this step, looked up once for the γ policy's question and the proposal."""
        if seq.draft_state is None:
            seq.draft_state = _Both()
        both = seq.draft_state
        if both.lookup is None or both.lookup[:2] != (len(seq.all_ids), limit):
            both.lookup = (len(seq.all_ids), limit, self._call("suffix", [seq], lambda: self.suffix.draft(seq, limit)))
        return both.lookup[2]

    def runs_model_for(self, seq: Sequence) -> bool:
        return len(self._suffix_draft(seq, LOOKAHEAD)) < MIN_SUFFIX_TOKENS

    def pending(self, seq: Sequence) -> int:
        return self._call("model", [seq], lambda: self.model.pending(seq))

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        out: list[Proposal | None] = [None] * len(seqs)
        by_model = []
        for i, (s, g) in enumerate(zip(seqs, gammas)):
            tokens = self._suffix_draft(s, max(g, LOOKAHEAD))
            if len(tokens) >= MIN_SUFFIX_TOKENS or g == 0:
                out[i] = Proposal(tokens[:g])
            else:
                by_model.append(i)
        if by_model:
            group = [seqs[i] for i in by_model]
            proposals = self._call("model", group, lambda: self.model.propose(group, [gammas[i] for i in by_model]))
            for i, p in zip(by_model, proposals):
                out[i] = p
        return out

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        self._call("model", [seq], lambda: self.model.rollback(seq, valid_len))

    def release(self, seq: Sequence) -> None:
        self._call("suffix", [seq], lambda: self.suffix.release(seq))
        self._call("model", [seq], lambda: self.model.release(seq))
        seq.draft_state = None
