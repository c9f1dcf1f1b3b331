"""The plain types every layer shares: requests, sampling and speculation parameters, how a request ended.

No protobuf and no torch here: the engine, the benchmark and the server all speak these dataclasses, and only
``specdec.serving.wire`` translates them to and from the wire.

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
CACHE_SCOPE_MAX = 128  # characters of speculation.cache_scope
TOP_LOGPROBS_MAX = 20  # alternatives per token (top_logprobs)
# Bytes of a response_format's schema, regex or grammar: far above any real schema, and it bounds the compile's input.
RESPONSE_FORMAT_MAX_BYTES = 65536
RESPONSE_FORMAT_KINDS = ("json_schema", "json_object", "regex", "grammar")
# What a model can run in (``specdec.models.loading``): auto, float dtypes, and weight-only quantised formats.
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "gguf", "int8", "q4")


class Method(str, Enum):
    """How draft tokens are proposed."""

    DRAFT = "draft"  # the small draft model
    NGRAM = "ngram"  # prompt lookup: no model
    SUFFIX = "suffix"  # earlier prompts and outputs of the same scope: no model
    AUTO = "auto"  # suffix drafting where earlier text agrees, the draft model elsewhere, per step
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
        _require(0 <= self.top_k < 1 << 31, f"sampling.top_k must be in [0, 2^31 - 1] (0 = off), got {self.top_k}")
        _finite("sampling.top_p", self.top_p)
        _require(0.0 < self.top_p <= 1.0, f"sampling.top_p must be in (0, 1], got {self.top_p}")
        _finite("sampling.min_p", self.min_p)
        _require(0.0 <= self.min_p < 1.0, f"sampling.min_p must be in [0, 1), got {self.min_p}")
        if self.seed is not None:
            _require(0 <= self.seed < 1 << 64, f"sampling.seed must be in [0, 2^64), got {self.seed}")


@dataclass
class SpeculationParams:
    """method None means the server's default. gamma fixes γ; gamma_max bounds the adaptive γ; at most one is set."""

    method: Method | None = None
    gamma: int | None = None
    gamma_max: int | None = None
    cache_scope: str = ""  # whose earlier text the suffix drafter may draft from ("": the shared default)
    tenant: str = ""  # the caller's proven identity: set by the server from the channel, never by a request

    @property
    def scope(self) -> str:
        """The key of the text and prefix-cache blocks this request may share: its cache_scope within its tenant's
        (the length prefix keeps every (tenant, cache_scope) pair apart)."""
        return f"{len(self.tenant)}:{self.tenant}/{self.cache_scope}"

    def validate(self, prefix: str = "speculation.") -> None:
        """``prefix`` is how the fields are named where they came from (``speculation.`` in a GenerateRequest)."""
        _require(len(self.cache_scope) <= CACHE_SCOPE_MAX,
                 f"{prefix}cache_scope must be at most {CACHE_SCOPE_MAX} characters, got {len(self.cache_scope)}")  # fmt: skip
        _require(
            self.gamma is None or self.gamma_max is None,
            f"{prefix}gamma (fixed γ) and {prefix}gamma_max (adaptive γ) are exclusive, got gamma={self.gamma} "
            f"and gamma_max={self.gamma_max}",
        )
        if self.gamma is not None:
            _require(0 <= self.gamma <= GAMMA_LIMIT, f"{prefix}gamma must be in [0, {GAMMA_LIMIT}], got {self.gamma}")
        if self.gamma_max is not None:
            _require(
                1 <= self.gamma_max <= GAMMA_LIMIT,
                f"{prefix}gamma_max must be in [1, {GAMMA_LIMIT}], got {self.gamma_max}",
            )


@dataclass(frozen=True)
class ResponseFormat:
    """What the output must be: ``kind`` is one of RESPONSE_FORMAT_KINDS; ``spec`` the schema, regex or Lark grammar
    (empty for json_object). ``specdec.engine.grammar`` compiles it."""

    kind: str
    spec: str = ""

    def validate(self) -> None:
        _require(self.kind in RESPONSE_FORMAT_KINDS,
                 f"response_format must be one of {', '.join(RESPONSE_FORMAT_KINDS)}, got {self.kind!r}")  # fmt: skip
        size = len(self.spec.encode())
        _require(size <= RESPONSE_FORMAT_MAX_BYTES,
                 f"response_format.{self.kind} must be at most {RESPONSE_FORMAT_MAX_BYTES} bytes, got {size}")  # fmt: skip
        if self.kind != "json_object":
            _require(size > 0, f"response_format.{self.kind} must not be empty")


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
    top_logprobs: int = 0  # alternatives per token; > 0 implies logprobs
    response_format: ResponseFormat | None = None
    request_id: str = ""

    @property
    def reports_logprobs(self) -> bool:
        return self.logprobs or self.top_logprobs > 0

    def check_output_options(self) -> None:
        """top_logprobs' range, and no ignore_eos beside a response format (which decides where the output ends)."""
        _require(0 <= self.top_logprobs <= TOP_LOGPROBS_MAX,
                 f"top_logprobs must be in [0, {TOP_LOGPROBS_MAX}], got {self.top_logprobs}")  # fmt: skip
        _require(self.response_format is None or not self.ignore_eos,
                 "ignore_eos cannot be used with response_format: the format decides where the output may end")  # fmt: skip

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
        self.check_output_options()
        if self.response_format is not None:
            self.response_format.validate()
        self.sampling.validate()
        self.speculation.validate()


@dataclass
class ParsedRequest:
    """A request validated as far as the message alone decides; ``Engine.prepare`` makes it a ``GenerationRequest``,
    tokenizing a prompt that is still text (the server tokenizes text on a thread of its own first)."""

    request_id: str
    prompt_kind: str  # "text", "token_ids" or "messages"
    prompt: str | list[int] | list[dict[str, str]]
    template: GenerationRequest = field(repr=False)  # everything but prompt_ids
    max_prompt_tokens: int | None = None  # checked once the prompt is tokenized


@dataclass(frozen=True)
class TopLogprobs:
    """The most likely tokens at one position, most likely first (ties: lower id first)."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass
class Completion:
    """How one request ended, with its statistics; built on the scheduler's thread."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float] | None
    top_logprobs: list[TopLogprobs] | None
    finish_reason: FinishReason
    matched_stop: str | None
    seed: int | None  # None: the request ended before it started and asked for no seed
    method: str
    prompt_tokens: int
    completion_tokens: int
    queue_s: float
    ttft_s: float | None
    e2e_s: float
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    per_position_acceptance: list[float] = field(default_factory=list)
    cached_prompt_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.e2e_s if self.e2e_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        if self.ttft_s is None or self.completion_tokens < 2 or self.e2e_s <= self.ttft_s:
            return 0.0
        return (self.completion_tokens - 1) / (self.e2e_s - self.ttft_s)

    def log_fields(self) -> dict:
        return {
            "request_id": self.request_id,
            "finish_reason": self.finish_reason.value,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "queue_s": round(self.queue_s, 6),
            "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6),
            "e2e_s": round(self.e2e_s, 6),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "method": self.method,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "verify_steps": self.verify_steps,
            "acceptance_rate": round(self.acceptance_rate, 4),
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "seed": self.seed,
        }
