"""One request's state inside the engine: its tokens, its target KV cache, its γ policy state and its metrics.

What its drafter keeps for it (a draft model's KV cache) lives in ``draft_state``, which only that drafter
reads or writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from specdec.engine.detokenizer import Detokenizer
from specdec.engine.gamma import AcceptanceEstimate, ProbeSchedule
from specdec.engine.grammar import Constraint
from specdec.types import FinishReason, GenerationRequest, Method, TopLogprobs


@dataclass
class StepOutput:
    token_ids: list[int]
    text: str  # UTF-8-safe delta; the deltas of a sequence concatenate to its final text
    logprobs: list[float] | None
    top_logprobs: list[TopLogprobs] | None = None
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: str | None = None


@dataclass
class SequenceMetrics:
    prompt_tokens: int
    completion_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    tested: int = 0  # drafts whose acceptance was decided: the accepted ones plus the first rejected one
    verify_steps: int = 0
    step_tokens: int = 0  # accepted + 1 per verify step, before any truncation by stops
    per_position_proposed: list[int] = field(default_factory=list)
    per_position_accepted: list[int] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache
    first_step_at: float | None = None
    first_token_at: float | None = None
    draft_s: float = 0.0
    target_s: float = 0.0  # verify forwards; the first step's prefill is counted apart, in prefill_s
    prefill_s: float = 0.0
    kernel_s: float = 0.0
    other_s: float = 0.0
    grammar_s: float = 0.0  # in the grammar's masks (part of the draft and other times above)
    forced: int = 0  # tokens the grammar allowed alone, verified without drafting (jump-forward)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def alpha(self) -> float:
        """Per-position acceptance probability (what E(α, γ) takes); acceptance_rate is lower when γ truncates."""
        return self.accepted / self.tested if self.tested else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.step_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.per_position_accepted, self.per_position_proposed)]

    @property
    def ttft_s(self) -> float | None:
        """From the sequence's first step (after any queueing) to its first emitted token."""
        if self.first_token_at is None or self.first_step_at is None:
            return None
        return self.first_token_at - self.first_step_at

    def record_proposal(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            if i == len(self.per_position_proposed):
                self.per_position_proposed.append(0)
                self.per_position_accepted.append(0)
            self.per_position_proposed[i] += 1
            self.per_position_accepted[i] += int(i < accepted)
        self.proposed += proposed
        self.accepted += accepted
        self.tested += accepted + (accepted < proposed)


class Sequence:
    """One request's state: token ids, KV caches, detokenizer, γ policy state and metrics."""

    def __init__(
        self, request: GenerationRequest, seed: int, method: Method, detok: Detokenizer, shared_alpha: AcceptanceEstimate
    ) -> None:
        self.request = request
        self.seed = seed
        self.method = method  # whose drafter proposes for it (the engine maps methods to drafters)
        self.detok = detok
        self.all_ids: list[int] = list(request.prompt_ids)
        self.target_cache = None
        self.target_len = 0  # tokens of all_ids held in the target cache
        # Tokens of the target cache that a cold prefill would compute alike, up to a block boundary: what it may
        # give the prefix cache (PrefixCache.extend). None until the prefix cache was asked for a hit.
        self.target_canonical: int | None = None
        self.draft_state: Any = None  # the drafter's own, for this sequence (Drafter.release frees it)
        self.constraint: Constraint | None = None  # the grammar state of a request with a response_format
        self.step_index = 0  # the RNG offset of the next step
        # α of this request. Its prior is the drafter's recent α across requests when that is lower than the
        # default prior: a draft that is rarely accepted stops costing every new request its first steps, while a
        # high α after easy prompts does not make the first steps of a hard one draft long.
        self.shared_alpha = shared_alpha
        # A sampled request with a seed must give the same tokens every time, so its γ may depend on nothing but its
        # own history: not on other requests' α, not on measured step costs (Engine._gammas).
        self.reproducible = request.sampling.seed is not None and not request.sampling.greedy
        prior = AcceptanceEstimate.DEFAULT_PRIOR
        self.alpha = AcceptanceEstimate(prior=prior if self.reproducible else min(prior, shared_alpha.alpha))
        self.probe = ProbeSchedule()
        self.finished = False
        self.finish_reason: FinishReason | None = None
        self.metrics = SequenceMetrics(prompt_tokens=len(request.prompt_ids))

    @property
    def holds_cache(self) -> bool:
        """Whether a KV cache (the target's or the drafter's) is still held for this sequence."""
        return self.target_cache is not None or self.draft_state is not None

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.metrics.prompt_tokens :]

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def matched_stop(self) -> str | None:
        return self.detok.matched_stop
