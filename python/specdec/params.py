"""Request parameters shared by the engine, the server and the benchmark.

Validation lives here, once: every check raises ``ValueError`` whose message names the field (with the
same dotted name as the gRPC request), the allowed range and the value received. The server maps
``ValueError`` to INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

# Upper bound on γ: verify cost grows with it and no real pair accepts 32+ tokens in a row often enough.
GAMMA_LIMIT = 32


class Method(str, Enum):
    """How draft tokens are proposed."""

    DRAFT = "draft"  # the small draft model
    NGRAM = "ngram"  # prompt lookup: no model
    NONE = "none"  # target-only decoding through the same engine (the baseline)


class FinishReason(str, Enum):
    LENGTH = "length"
    EOS = "eos"
    STOP_SEQUENCE = "stop_sequence"
    STOP_TOKEN = "stop_token"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


def stack_filters(samplings: list[SamplingParams]) -> dict[str, np.ndarray]:
    """Per-row kernel processing arguments for a batch of requests.

    Floats stay float64, as validated and as the kernels take them: float32 would round a valid top_p of 1e-300
    to 0 and a min_p of 0.99999999999 to 1, which the kernel rejects, failing every request of the batch."""
    return {
        "temperature": np.array([s.temperature for s in samplings], dtype=np.float64),
        "top_k": np.array([s.top_k for s in samplings], dtype=np.int32),
        "top_p": np.array([s.top_p for s in samplings], dtype=np.float64),
        "min_p": np.array([s.min_p for s in samplings], dtype=np.float64),
    }


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _finite(name: str, value: float) -> None:
    _require(isinstance(value, (int, float)) and math.isfinite(value), f"{name} must be a finite number, got {value!r}")


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_k 0, top_p 1.0 and min_p 0 switch their filter off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None  # None: the engine picks one and reports it

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        _finite("sampling.temperature", self.temperature)
        _require(0.0 <= self.temperature <= 100.0, f"sampling.temperature must be in [0, 100], got {self.temperature}")
        _require(0 <= self.top_k <= 1 << 31, f"sampling.top_k must be in [0, 2^31] (0 = off), got {self.top_k}")
        _finite("sampling.top_p", self.top_p)
        _require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _finite("sampling.min_p", self.min_p)
        _require(0.0 <= self.min_p < 1.0, f"sampling.min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None:
            _require(0 <= self.seed < 1 << 64, f"sampling.seed must be in [0, 2^64), got {self.seed}")


@dataclass
class SpeculationParams:
    """method None means the server's default. gamma fixes γ; gamma_max with adaptive=True bounds it."""

    method: Method | None = None
    gamma: int | None = None
    gamma_max: int | None = None
    adaptive: bool | None = None

    def validate(self) -> None:
        if self.gamma is not None:
            _require(0 <= self.gamma <= GAMMA_LIMIT, f"speculation.gamma must be in [0, {GAMMA_LIMIT}], got {self.gamma}")
        if self.gamma_max is not None:
            _require(
                1 <= self.gamma_max <= GAMMA_LIMIT,
                f"speculation.gamma_max must be in [1, {GAMMA_LIMIT}], got {self.gamma_max}",
            )


@dataclass
class GenerationRequest:
    """One request as the engine sees it: token ids in, limits and sampling as plain values."""

    prompt_ids: list[int]
    max_new_tokens: int = 64
    sampling: SamplingParams = field(default_factory=SamplingParams)
    speculation: SpeculationParams = field(default_factory=SpeculationParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    request_id: str = ""

    def validate(self, *, vocab_size: int, context_length: int) -> None:
        _require(len(self.prompt_ids) > 0, "prompt must not be empty (got 0 tokens)")
        for i, t in enumerate(self.prompt_ids):
            _require(0 <= t < vocab_size, f"prompt_token_ids[{i}] must be in [0, {vocab_size}), got {t}")
        _require(self.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        total = len(self.prompt_ids) + self.max_new_tokens
        _require(
            total <= context_length,
            f"prompt tokens + max_new_tokens must be <= the target's context length {context_length}, "
            f"got {len(self.prompt_ids)} + {self.max_new_tokens} = {total}",
        )
        for i, t in enumerate(self.stop_token_ids):
            _require(0 <= t < vocab_size, f"stop_token_ids[{i}] must be in [0, {vocab_size}), got {t}")
        for i, s in enumerate(self.stop):
            _require(len(s) > 0, f"stop[{i}] must be a non-empty string")
        self.sampling.validate()
        self.speculation.validate()
