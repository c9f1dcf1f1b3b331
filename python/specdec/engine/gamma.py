"""Choosing γ: an online estimate of the acceptance rate α and of step costs, and the bound that ranks γ.

Expected tokens per verify step with γ drafts of acceptance α is E(α, γ) = (1 − α^(γ+1)) / (1 − α)
(Leviathan et al. 2023). A step costs γ draft forwards plus one target forward over γ+1 tokens, so the
γ that maximises E(α, γ) / (γ·t_draft + T_target(γ+1)) maximises tokens per second. With a target whose
verify cost does not depend on k this is the familiar E / (γc + 1) with c = t_draft / T_target.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable


def expected_tokens(alpha: float, gamma: int) -> float:
    """E(α, γ): mean tokens emitted per verify step, bonus included."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def analytic_bound(alpha: float, gamma: int, c: float) -> float:
    """The speedup bound E(α, γ) / (γc + 1) over target-only decoding."""
    return expected_tokens(alpha, gamma) / (gamma * c + 1.0)


class RecentMedian:
    """The median of the last ``n`` samples. One slow step (a page fault, a neighbour's burst on a shared
    machine) cannot move it, where an average kept such a spike for many steps and, if it made a size look
    too costly to choose again, for good; a lasting change shows within n/2 samples."""

    def __init__(self, n: int = 5) -> None:
        self.samples: deque[float] = deque(maxlen=n)
        self.value = math.nan  # set by the first update; the γ search reads it many times per step

    def update(self, x: float) -> None:
        self.samples.append(x)
        self.value = statistics.median(self.samples)


class StepCosts:
    """Measured seconds of batched forwards, shared by an engine's sequences.

    Both models are keyed by the tokens in one forward (all rows together, padding included): a target
    verify at batch 1 is k = γ + 1 tokens, a draft step is one token per row, and a draft catching up on a
    sequence it has not seen is that sequence's pending tokens. More tokens is what makes a forward turn
    compute-bound as the batch grows.

    A size not measured yet is estimated from the nearest smaller one: the same cost up to ``flat_tokens``
    (where a forward stays memory-bound: the small-M kernel holds 8 rows per weight row in registers), so
    that larger γ gets tried; beyond it, a cost growing with the tokens, so that a batch does not explore
    γ values whose verify is compute-bound and many times a decode step. No forward is taken to cost more
    than a measured larger one.

    Target forwards are also kept per batch size: 8 tokens cost more as 8 rows' decode step than as one row's
    verify (each row attends to its own, padded, cache), so a batch size's own measurements are used once it
    has any.
    """

    def __init__(self, flat_tokens: int = 8) -> None:
        self.flat_tokens = flat_tokens
        self.draft: dict[int, RecentMedian] = {}
        self.target: dict[int, RecentMedian] = {}
        self.target_by_rows: dict[int, dict[int, RecentMedian]] = {}

    def record_draft(self, tokens: int, seconds: float) -> None:
        self.draft.setdefault(tokens, RecentMedian()).update(seconds)

    def record_target(self, tokens: int, seconds: float, rows: int = 1) -> None:
        self.target.setdefault(tokens, RecentMedian()).update(seconds)
        self.target_by_rows.setdefault(rows, {}).setdefault(tokens, RecentMedian()).update(seconds)

    def draft_cost(self, tokens: int) -> float | None:
        return self._estimate(self.draft, tokens)

    def target_cost(self, tokens: int, rows: int | None = None) -> float | None:
        """Seconds of a target forward over ``tokens``, from forwards over ``rows`` rows where any were measured."""
        return self._estimate(self.target_by_rows.get(rows) or self.target, tokens)

    def _estimate(self, table: dict[int, RecentMedian], tokens: int) -> float | None:
        known = _nearest_key(table, tokens)
        if known is None:
            return None
        cost = table[known].value
        if tokens > known and tokens > self.flat_tokens:
            cost *= tokens / max(known, self.flat_tokens)
        return min([cost] + [m.value for k, m in table.items() if k > tokens])

    def cost_ratio(self) -> float | None:
        """c = one draft forward ÷ one one-token target forward, at batch 1."""
        d, t = self.draft_cost(1), self.target_cost(1)
        return None if d is None or t is None else d / t


def _nearest_key(table: dict[int, RecentMedian], key: int) -> int | None:
    """``key`` if measured, else the nearest smaller measured key (else the smallest)."""
    if not table:
        return None
    below = [k for k in table if k <= key]
    return max(below) if below else min(table)


class AcceptanceEstimate:
    """α, the per-position acceptance probability, from recent verify steps.

    A step stops at its first rejection, so the drafts after it are never tested: accepted ÷ proposed
    underestimates α (true α = 0.8 at γ = 8 gives about 0.42). Each step instead counts its accepted drafts
    as successes and its one rejection, if any, as a failure, the maximum-likelihood estimate for this
    truncated geometric. A prior makes the first steps speculate; decay tracks drift.
    """

    DEFAULT_PRIOR = 0.6

    def __init__(self, prior: float = DEFAULT_PRIOR, prior_weight: float = 2.0, decay: float = 0.85) -> None:
        self.accepted = prior * prior_weight
        self.tested = prior_weight
        self.decay = decay

    def update(self, proposed: int, accepted: int) -> None:
        """One verify step that proposed ``proposed`` drafts and accepted the first ``accepted`` of them."""
        self.accepted = self.accepted * self.decay + accepted
        self.tested = self.tested * self.decay + accepted + (accepted < proposed)

    @property
    def alpha(self) -> float:
        return self.accepted / self.tested


class ProbeSchedule:
    """When a request whose policy chose γ = 0 drafts once anyway, so that a recovering α gets noticed.

    The first probe comes after ``first`` steps at γ = 0. A rejected probe doubles the wait, up to ``most``
    (each probe pays for the draft's catch-up over the tokens it skipped); an accepted one resets it. No
    probe is made while γ = 0 is chosen for cost rather than for α (a batch whose verify is compute-bound:
    speculation would not pay even if the draft agreed), so a busy server never drafts at all.
    """

    def __init__(self, first: int = 16, most: int = 128) -> None:
        self.first, self.most = first, most
        self.wait = first
        self.streak = 0
        self.probing = False

    def gamma(self, chosen: int, could_pay: bool = True) -> int:
        """The γ to use this step, given the policy's choice and whether any γ > 0 could pay at a good α."""
        self.streak = self.streak + 1 if chosen == 0 and could_pay else 0
        if self.streak < self.wait:
            return chosen
        self.streak, self.probing = 0, True
        return 1

    def record(self, proposed: int, accepted: int) -> None:
        """The outcome of a verify step (a probe's if one was pending and it drafted)."""
        if self.probing and proposed:
            self.wait = self.first if accepted else min(2 * self.wait, self.most)
            self.probing = False


def choose_gamma(
    alphas: list[float],
    draft_cost: float | None,
    target_cost: Callable[[int], float | None],
    gamma_max: int,
    catch_up: list[tuple[float, int]] | None = None,
) -> int:
    """The common γ in 0..gamma_max that maximises expected tokens per second for rows drafting together.

    ``draft_cost`` is seconds per draft forward over these rows (0 for model-free drafters);
    ``target_cost(m)`` is seconds for a verify forward over m tokens. ``catch_up[i]`` is (seconds, tokens
    left) for row i: the one-off draft forward over the tokens its draft has not seen (0 when it has seen
    them all), paid before it can draft and spread over the steps it has left at that γ. Until both costs
    are measured: gamma_max.
    """
    if draft_cost is None or target_cost(1) is None:
        return gamma_max
    catch_up = catch_up or [(0.0, 1)] * len(alphas)
    best, best_rate = 0, -math.inf
    for g in range(gamma_max + 1):
        per_row = [expected_tokens(a, g) for a in alphas]
        once = sum(seconds * e / max(left, 1) for e, (seconds, left) in zip(per_row, catch_up)) if g else 0.0
        rate = sum(per_row) / (g * draft_cost + once + target_cost(len(alphas) * (g + 1)))
        if rate > best_rate:
            best, best_rate = g, rate
    return best
