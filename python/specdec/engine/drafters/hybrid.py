"""The hybrid drafter (METHOD_AUTO): suffix drafting where earlier text continues the context with confidence, the
draft model elsewhere, decided per sequence and step.

A step drafts from the suffix index when the index offers at least ``MIN_SUFFIX_TOKENS`` drafts and, at the
acceptance each path has had in this sequence, those drafts are expected to give more tokens per second than the
draft model at its best γ (the cost model of ``engine.gamma``, with the measured step costs). Such a step costs no
model forward, and the engine's γ policy treats it as a model-free drafter's (γ from α alone, ``runs_model_for``);
any other step runs the draft model, which first reads the tokens the suffix steps emitted (its catch-up). Both
sub-drafters keep their own per-sequence state; the hybrid holds the two side by side in ``seq.draft_state`` and
hands each its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.drafters.draft_model import DraftModelDrafter
from specdec.engine.drafters.suffix import SuffixDrafter
from specdec.engine.gamma import AcceptanceEstimate, expected_tokens
from specdec.engine.sequence import Sequence

# Suffix drafts a step needs before it skips the draft model. Short matches on ordinary prompts are often common
# n-grams whose continuation the model drafts better; a re-sent conversation's matches run long either way
# (`specdec bench --method auto` against `--method draft` on the built-in prompts, and `--scenario agent-loop`).
MIN_SUFFIX_TOKENS = 4
# How far a suffix lookup looks ahead when deciding (the engine then caps it at the step's γ).
LOOKAHEAD = 8
# The suffix path's α before a sequence has tried it: optimistic, so that it is tried and its α learnt (a path
# never chosen never updates); two rejected steps bring it below the draft model's where the drafts are poor.
SUFFIX_PRIOR = 0.9


@dataclass
class _Both:
    suffix: Any = None
    model: Any = None
    lookup: tuple[int, int, list[int]] | None = None  # (context length, limit, drafts): asked twice a step
    # Per path, α over this sequence's steps that drafted that way; the step in flight: (path, length, drafts).
    alpha: dict[str, AcceptanceEstimate] = field(default_factory=lambda: {
        "suffix": AcceptanceEstimate(prior=SUFFIX_PRIOR), "model": AcceptanceEstimate()})
    last: tuple[str, int, int] | None = None


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
        return not self._suffix_pays(seq, len(self._suffix_draft(seq, LOOKAHEAD)))

    def _suffix_pays(self, seq: Sequence, offered: int) -> bool:
        """Whether ``offered`` suffix drafts beat the draft model in expected tokens per second, each at its own α in
        this sequence (until the costs are measured: whenever MIN_SUFFIX_TOKENS are offered)."""
        if offered < MIN_SUFFIX_TOKENS:
            return False
        costs, alpha = self.model.costs, seq.draft_state.alpha
        draft, target = costs.draft_cost(1), costs.target_cost
        if draft is None or target(1) is None:
            return True
        by_suffix = expected_tokens(alpha["suffix"].alpha, offered) / target(offered + 1)
        by_model = max(expected_tokens(alpha["model"].alpha, g) / (g * draft + target(g + 1)) for g in range(1, LOOKAHEAD + 1))
        return by_suffix >= by_model

    def pending(self, seq: Sequence) -> int:
        return self._call("model", [seq], lambda: self.model.pending(seq))

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        out: list[Proposal | None] = [None] * len(seqs)
        by_model = []
        for i, (s, g) in enumerate(zip(seqs, gammas)):
            tokens = self._suffix_draft(s, max(g, LOOKAHEAD))
            if g == 0 or self._suffix_pays(s, len(tokens)):
                out[i] = Proposal(tokens[:g])
                s.draft_state.last = ("suffix", len(s.all_ids), len(out[i].tokens))
            else:
                by_model.append(i)
        if by_model:
            group = [seqs[i] for i in by_model]
            proposals = self._call("model", group, lambda: self.model.propose(group, [gammas[i] for i in by_model]))
            for i, p in zip(by_model, proposals):
                out[i] = p
                seqs[i].draft_state.last = ("model", len(seqs[i].all_ids), len(p.tokens))
        return out

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        both = seq.draft_state
        if both is not None and both.last is not None:  # the verify of the step in flight: count it to its path
            path, length, drafted = both.last
            if drafted:
                both.alpha[path].update(drafted, max(0, min(valid_len - length, drafted)))
            both.last = None
        self._call("model", [seq], lambda: self.model.rollback(seq, valid_len))

    def release(self, seq: Sequence) -> None:
        self._call("suffix", [seq], lambda: self.suffix.release(seq))
        self._call("model", [seq], lambda: self.model.release(seq))
        seq.draft_state = None
