"""Choosing γ: an online estimate of the acceptance rate α and of step costs, and the bound that ranks γ.

Expected tokens per verify step with γ drafts of acceptance α is E(α, γ) = (1 − α^(γ+1)) / (1 − α)
(Leviathan et al. 2023). A step costs γ draft forwards plus one target forward over γ+1 tokens, so the
γ that maximises E(α, γ) / (γ·t_draft + T_target(γ+1)) maximises tokens per second. With a target whose
verify cost does not depend on k this is the familiar E / (γc + 1) with c = t_draft / T_target.
"""

from __future__ import annotations

import math
from collections.abc import Callable


def expected_tokens(alpha: float, gamma: int) -> float:
    """E(α, γ): mean tokens emitted per verify step, bonus included."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def analytic_bound(alpha: float, gamma: int, c: float) -> float:
    """The speedup bound E(α, γ) / (γc + 1) over target-only decoding."""
    return expected_tokens(alpha, gamma) / (gamma * c + 1.0)


class Ema:
    """Exponential moving average that starts at its first sample."""

    def __init__(self, weight: float = 0.3) -> None:
        self.weight = weight
        self.value: float | None = None

    def update(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class StepCosts:
    """Measured seconds for one draft token and for a target forward over k new tokens (shared per engine)."""

    def __init__(self) -> None:
        self.draft = Ema()
        self.target: dict[int, Ema] = {}

    def record_draft(self, seconds: float) -> None:
        self.draft.update(seconds)

    def record_target(self, k: int, seconds: float) -> None:
        self.target.setdefault(k, Ema()).update(seconds)

    def target_cost(self, k: int) -> float | None:
        """Cost of verifying k tokens; unmeasured k borrows the nearest measured smaller k (optimistic, so it gets tried)."""
        known = [j for j in self.target if self.target[j].value is not None]
        if not known:
            return None
        below = [j for j in known if j <= k]
        return self.target[max(below) if below else min(known)].value

    def cost_ratio(self) -> float | None:
        """c = draft forward time ÷ one-token target forward time."""
        t1 = self.target_cost(1)
        return None if t1 is None or self.draft.value is None else self.draft.value / t1


class AcceptanceEstimate:
    """α from recent proposals, with a prior so that the first steps speculate and with decay to track drift."""

    def __init__(self, prior: float = 0.6, prior_weight: float = 2.0, decay: float = 0.85) -> None:
        self.accepted = prior * prior_weight
        self.proposed = prior_weight
        self.decay = decay

    def update(self, proposed: int, accepted: int) -> None:
        self.accepted = self.accepted * self.decay + accepted
        self.proposed = self.proposed * self.decay + proposed

    @property
    def alpha(self) -> float:
        return self.accepted / self.proposed


def choose_gamma(
    alpha: float, draft_cost: float | None, target_cost: Callable[[int], float | None], gamma_max: int
) -> int:
    """The γ in 0..gamma_max with the most expected tokens per second; gamma_max until costs are measured.

    ``draft_cost`` is seconds per draft token (0 for model-free drafters); ``target_cost(k)`` is seconds for
    a target forward over k new tokens.
    """
    if draft_cost is None or target_cost(1) is None:
        return gamma_max
    best, best_rate = 0, -math.inf
    for g in range(gamma_max + 1):
        rate = expected_tokens(alpha, g) / (g * draft_cost + target_cost(g + 1))
        if rate > best_rate:
            best, best_rate = g, rate
    return best
