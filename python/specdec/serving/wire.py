"""Between the wire and the engine: ``specdec.v1`` messages to request parameters and results back.

Validation happens in two places, both raising ``ValueError`` whose message names the field by its dotted
path in ``GenerateRequest``, the allowed range and the value received (the server maps it to
INVALID_ARGUMENT):
- ``parse_request`` checks what the message alone decides (which prompt form, request id, roles, list
  sizes, enum values, exclusive options, and the sampling/speculation ranges of ``specdec.types``);
- the tokenizer checks a text or chat prompt's length (``engine.prompts``, on the server's tokenizing thread), and
  ``Engine.start`` what needs the model (token ids against the vocabulary, the context length);
  ``engine_message`` renames their field paths to the proto's where they differ.

This is the only module that converts between ``specdec.v1`` messages and ``specdec.types``.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, replace

from specdec.types import (
    RESPONSE_FORMAT_KINDS,
    Completion,
    FinishReason,
    GenerationRequest,
    Method,
    ParsedRequest,
    ResponseFormat,
    SamplingParams,
    SpeculationParams,
    TopLogprobs,
)
from specdec.v1 import specdec_pb2 as pb

ROLES = ("system", "user", "assistant", "tool")

METHOD_TO_PROTO = {Method.DRAFT: pb.METHOD_DRAFT, Method.NGRAM: pb.METHOD_NGRAM, Method.SUFFIX: pb.METHOD_SUFFIX,
                   Method.AUTO: pb.METHOD_AUTO, Method.NONE: pb.METHOD_NONE}  # fmt: skip
METHOD_FROM_PROTO = {v: k for k, v in METHOD_TO_PROTO.items()}
FINISH_TO_PROTO = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.STOP_TOKEN: pb.FINISH_REASON_STOP_TOKEN,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.DEADLINE: pb.FINISH_REASON_DEADLINE,
}


@dataclass(frozen=True)
class Limits:
    """Per-request limits (the README's limits table; ``specdec serve --max-*`` flags). All but
    ``max_prompt_tokens`` for text and chat prompts are decided by the message alone; that one is checked once
    the prompt is tokenized (on the server's tokenizing thread)."""

    max_request_id_length: int = 128
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_stop_token_ids: int = 64
    max_messages: int = 256
    default_max_new_tokens: int = 64
    max_new_tokens: int | None = None  # the largest max_new_tokens a request may ask for (None: the context length)
    max_prompt_tokens: int = 8192  # prompt tokens after tokenizing (--max-prompt-tokens)
    # The largest γ a request may fix or bound its adaptive γ by (--max-gamma; None: no bound beyond the API's
    # range). A server sets it to the largest γ its own policy uses, so that no client buys longer verifies.
    max_gamma: int | None = None


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _enum_name(enum, value: int) -> str:
    try:
        return enum.Name(value)
    except ValueError:
        return str(value)


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_request_id(request_id: str, limits: Limits) -> None:
    n = limits.max_request_id_length
    _require(len(request_id) <= n, f"request_id must be at most {n} characters, got {len(request_id)}")
    bad = next((c for c in request_id if not " " <= c <= "~"), None)
    _require(bad is None, f"request_id must be printable ASCII (0x20-0x7e), got {bad!r} in {request_id!r}")


def sampling_from_proto(s: pb.SamplingOptions, prefix: str = "sampling") -> SamplingParams:
    p = SamplingParams()
    if s.HasField("temperature"):
        p.temperature = s.temperature
    if s.HasField("top_k"):
        p.top_k = s.top_k
    if s.HasField("top_p"):
        p.top_p = s.top_p
    if s.HasField("min_p"):
        p.min_p = s.min_p
    if s.HasField("seed"):
        p.seed = s.seed
    p.validate()
    return p


def method_from_proto(value: int, field_name: str) -> Method | None:
    if value == pb.METHOD_UNSPECIFIED:
        return None
    allowed = ", ".join(pb.Method.keys())
    _require(value in METHOD_FROM_PROTO, f"{field_name} must be one of {allowed}, got {_enum_name(pb.Method, value)}")
    return METHOD_FROM_PROTO[value]


def check_max_new_tokens(max_new: int, limits: Limits) -> None:
    """max_new_tokens against the server's --max-new-tokens-limit."""
    n = limits.max_new_tokens
    _require(n is None or max_new <= n, f"max_new_tokens must be <= {n} (limit max_new_tokens), got {max_new}")


def check_gamma(gamma: int | None, gamma_max: int | None, limits: Limits, prefix: str = "speculation.") -> None:
    """γ and γ_max against the server's --max-gamma (after their range in the API is checked)."""
    n = limits.max_gamma
    for name, value in (("gamma", gamma), ("gamma_max", gamma_max)):
        _require(n is None or value is None or value <= n,
                 f"{prefix}{name} must be <= {n} on this server (limit max_gamma), got {value}")  # fmt: skip


def speculation_from_proto(s: pb.SpeculationOptions) -> SpeculationParams:
    method = method_from_proto(s.method, "speculation.method")
    if s.disable:
        _require(
            method in (None, Method.NONE),
            f"speculation.disable is set, so speculation.method must be METHOD_UNSPECIFIED or METHOD_NONE, "
            f"got {pb.Method.Name(s.method)}",
        )
        method = Method.NONE
    gamma = s.gamma if s.HasField("gamma") else None
    gamma_max = s.gamma_max if s.HasField("gamma_max") else None
    p = SpeculationParams(method=method, gamma=gamma, gamma_max=gamma_max, cache_scope=s.cache_scope)
    p.validate()
    return p


def with_tenant(parsed: ParsedRequest, tenant: str) -> ParsedRequest:
    """``parsed`` within ``tenant``'s scope (the caller's proven identity; "" for none): requests of different tenants
    never share prefix-cache blocks or suffix-drafting text, whatever cache_scope they ask for."""
    speculation = replace(parsed.template.speculation, tenant=tenant)
    return replace(parsed, template=replace(parsed.template, speculation=speculation))


def parse_request(msg: pb.GenerateRequest, limits: Limits = Limits()) -> ParsedRequest:
    """Validate everything the message alone decides; raise ValueError naming the field."""
    check_request_id(msg.request_id, limits)
    request_id = msg.request_id or new_request_id()

    kind = msg.WhichOneof("prompt")
    _require(kind is not None, "prompt must be set: one of text, token_ids or messages")
    prompt: str | list[int] | list[dict[str, str]]
    if kind == "text":
        _require(len(msg.text) > 0, "text must not be empty")
        prompt = msg.text
    elif kind == "token_ids":
        _require(len(msg.token_ids.ids) > 0, "token_ids.ids must not be empty")
        prompt = list(msg.token_ids.ids)
        n = limits.max_prompt_tokens
        _require(len(prompt) <= n, f"prompt must be at most {n} tokens (limit max_prompt_tokens), got {len(prompt)}")
    else:
        messages = msg.messages.messages
        n = limits.max_messages
        _require(len(messages) > 0, "messages.messages must hold at least one message, got 0")
        _require(len(messages) <= n, f"messages.messages must hold at most {n} messages, got {len(messages)}")
        for i, m in enumerate(messages):
            _require(m.role in ROLES, f"messages.messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        prompt = [{"role": m.role, "content": m.content} for m in messages]

    n = limits.max_stop_strings
    _require(len(msg.stop) <= n, f"stop must hold at most {n} strings, got {len(msg.stop)} (limit max_stop_strings)")
    for i, s in enumerate(msg.stop):
        _require(len(s) > 0, f"stop[{i}] must be a non-empty string")
        _require(
            len(s) <= limits.max_stop_length,
            f"stop[{i}] must be at most {limits.max_stop_length} characters, got {len(s)} (limit max_stop_length)",
        )
    n = limits.max_stop_token_ids
    _require(len(msg.stop_token_ids) <= n, f"stop_token_ids must hold at most {n} ids, got {len(msg.stop_token_ids)}")

    max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else limits.default_max_new_tokens
    _require(max_new >= 1, f"max_new_tokens must be >= 1, got {max_new}")
    check_max_new_tokens(max_new, limits)

    speculation = speculation_from_proto(msg.speculation)
    check_gamma(speculation.gamma, speculation.gamma_max, limits)
    response_format = response_format_from_proto(msg.response_format) if msg.HasField("response_format") else None
    template = GenerationRequest(
        prompt_ids=[],
        max_new_tokens=max_new,
        sampling=sampling_from_proto(msg.sampling),
        speculation=speculation,
        stop=list(msg.stop),
        stop_token_ids=list(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        response_format=response_format,
        request_id=request_id,
    )
    template.check_output_options()
    return ParsedRequest(request_id, kind, prompt, template, max_prompt_tokens=limits.max_prompt_tokens)


def response_format_from_proto(msg: pb.ResponseFormat) -> ResponseFormat:
    kind = msg.WhichOneof("format")
    _require(kind is not None, f"response_format must set one of {', '.join(RESPONSE_FORMAT_KINDS)}")
    if kind == "json_object":
        _require(msg.json_object, "response_format.json_object must be true (leave response_format unset for free text)")
        fmt = ResponseFormat(kind)
    else:
        fmt = ResponseFormat(kind, getattr(msg, kind))
    fmt.validate()
    return fmt


def top_logprobs_to_proto(tops: list[TopLogprobs] | None) -> list[pb.TopLogprobs]:
    return [pb.TopLogprobs(token_ids=t.token_ids, logprobs=t.logprobs) for t in tops or []]


def engine_message(msg: str) -> str:
    """The engine names token-id prompts ``prompt_token_ids``; on the wire they are ``token_ids.ids``."""
    if msg.startswith("prompt_token_ids["):
        return "token_ids.ids[" + msg[len("prompt_token_ids[") :]
    return msg


def _finite(x: float | None) -> float:
    return x if x is not None and math.isfinite(x) else 0.0


def summary_to_proto(c: Completion) -> pb.CompletionSummary:
    return pb.CompletionSummary(
        finish_reason=FINISH_TO_PROTO.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        matched_stop=c.matched_stop or "",
        seed=c.seed or 0,
        usage=pb.Usage(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens,
                       cached_prompt_tokens=c.cached_prompt_tokens),
        timing=pb.Timing(
            queue_s=_finite(c.queue_s),
            ttft_s=_finite(c.ttft_s),
            e2e_s=_finite(c.e2e_s),
            tokens_per_s=_finite(c.tokens_per_s),
            decode_tokens_per_s=_finite(c.decode_tokens_per_s),
        ),
        speculation=pb.SpeculationStats(
            method=c.method,
            proposed=c.proposed,
            accepted=c.accepted,
            verify_steps=c.verify_steps,
            acceptance_rate=_finite(c.acceptance_rate),
            mean_accepted_length=_finite(c.mean_accepted_length),
            per_position_acceptance=[_finite(x) for x in c.per_position_acceptance],
        ),
    )


def response_to_proto(c: Completion) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=c.request_id,
        token_ids=c.token_ids,
        text=c.text,
        logprobs=c.logprobs or [],
        summary=summary_to_proto(c),
        top_logprobs=top_logprobs_to_proto(c.top_logprobs),
    )


def model_info_to_proto(info: dict, **extra) -> pb.GetModelInfoResponse:
    return pb.GetModelInfoResponse(
        target=str(info.get("target", "")),
        draft=str(info.get("draft", "")),
        target_dtype=str(info.get("target_dtype", "")),
        draft_dtype=str(info.get("draft_dtype", "")),
        device=str(info.get("device", "")),
        vocab_size=int(info.get("vocab_size", 0)),
        context_length=int(info.get("context_length", 0)),
        method=METHOD_TO_PROTO.get(Method(info["method"]), pb.METHOD_UNSPECIFIED) if info.get("method") else 0,
        gamma_policy=str(info.get("gamma_policy", "")),
        gamma=int(info.get("gamma") or 0),
        gamma_max=int(info.get("gamma_max") or 0),
        **extra,
    )
