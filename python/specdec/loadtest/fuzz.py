"""Fuzz: Hypothesis-generated hostile GenerateRequests; every answer must be OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED with a message, within the timeout."""

from __future__ import annotations

import json
import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from specdec.v1 import specdec_pb2 as pb
from specdec.v1 import specdec_pb2_grpc as pb_grpc


FUZZ_OK = ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED")

@dataclass
class FuzzStats:
    cases: int = 0
    outcomes: Counter = field(default_factory=Counter)  # status code name -> count
    bad: list[str] = field(default_factory=list)  # a disallowed status, an empty message or an inconsistent OK


FUZZ_FIELDS = ("request_id", "prompt", "sampling", "max_new_tokens", "stop", "stop_token_ids", "speculation",
               "response_format", "top_logprobs")
# Keys a random JSON schema is built from: JSON Schema's own, so that many draws are schemas that compile.
SCHEMA_KEYS = ("type", "properties", "items", "enum", "const", "required", "pattern", "minimum", "maximum", "maxLength",
               "minItems", "maxItems", "anyOf", "oneOf", "$ref", "$defs", "additionalProperties", "format")


def request_strategy(vocab_size: int, context_length: int, max_message_bytes: int):
    """GenerateRequests with hostile values: NaN/Inf, huge and negative counts, ids outside the vocabulary, long
    stop lists, empty and oversized prompts; in-vocabulary id prompts are often invalid UTF-8 (byte-level tokens).

    Each request makes 0, a few or all of its fields hostile and the rest plausible, so that valid requests
    (which generate) and single bad fields are both common. Valid max_new_tokens are 1..8: generation stays fast."""
    from hypothesis import strategies as st

    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, -0.0, 1.0, 1e-45, -1.0, 1e300, math.nan, math.inf, -math.inf]))  # fmt: skip
    i32 = st.integers(-(2**31), 2**31 - 1)
    in_vocab = st.integers(0, vocab_size - 1)
    token = st.one_of(in_vocab, st.integers(-3, vocab_size + 3), i32)
    short_text = st.text(min_size=1, max_size=40)

    def prompt(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        kinds = ["none", "empty", "long", "oversized", "bad_ids", "long_ids", "messages"] if hostile else ["text", "ids"]
        kind = draw(st.sampled_from(kinds))
        if kind in ("text", "empty", "long", "oversized"):
            r.text = draw({"text": short_text, "empty": st.just(""),
                           "long": st.integers(context_length, 4 * context_length).map(lambda n: "ab " * n),
                           "oversized": st.integers(1, 4096).map(lambda n: "x" * (max_message_bytes + n))}[kind])  # fmt: skip
        elif kind in ("ids", "bad_ids", "long_ids"):
            r.token_ids.SetInParent()
            ids = {"ids": st.lists(in_vocab, min_size=1, max_size=12), "bad_ids": st.lists(token, max_size=12),
                   # A short drawn list tiled to about the context length: Hypothesis draws at most ~8k elements.
                   "long_ids": st.tuples(st.lists(in_vocab, min_size=1, max_size=8), st.integers(-8, 8)).map(
                       lambda t: (t[0] * (context_length // len(t[0]) + 2))[: context_length + t[1]])}[kind]  # fmt: skip
            r.token_ids.ids.extend(draw(ids))
        elif kind == "messages":  # the tiny and chat-less models refuse; chat models check the roles
            r.messages.SetInParent()
            roles = st.sampled_from(["user", "system", "assistant", "tool", "bot", ""])
            for role, content in draw(st.lists(st.tuples(roles, st.text(max_size=20)), max_size=3)):
                r.messages.messages.add(role=role, content=content)

    def sampling(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        plausible = {"temperature": st.floats(0, 2), "top_p": st.floats(0.05, 1), "min_p": st.floats(0, 0.5),
                     "top_k": st.integers(0, 50)}  # fmt: skip
        for name in ("temperature", "top_p", "min_p", "top_k"):
            if draw(st.booleans()):
                setattr(r.sampling, name, draw((i32 if name == "top_k" else floats) if hostile else plausible[name]))
        if draw(st.booleans()):
            r.sampling.seed = draw(st.integers(0, 2**64 - 1))

    def speculation(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        if hostile:
            r.speculation.method = draw(st.sampled_from([0, 1, 2, 3, 7, -1]))
            r.speculation.disable = draw(st.booleans())
            for name in ("gamma", "gamma_max"):
                if draw(st.booleans()):
                    setattr(r.speculation, name, draw(st.one_of(st.integers(-2, 40), i32)))
            return
        r.speculation.method = draw(st.sampled_from([0, 1, 2, 3]))
        which = draw(st.sampled_from(["", "gamma", "gamma_max"]))
        if which:
            setattr(r.speculation, which, draw(st.integers(0 if which == "gamma" else 1, 8)))

    json_values = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=False), st.text(max_size=8),
                  st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "#/$defs/a"])),
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(st.one_of(st.sampled_from(SCHEMA_KEYS), st.text(max_size=6)), inner,
                                                max_size=4)),
        max_leaves=16)  # fmt: skip

    def response_format(r: pb.GenerateRequest, draw, hostile: bool) -> None:
        if not hostile:  # mostly free text; else a small format that compiles
            kind = draw(st.sampled_from(["", "", "", "json_object", "regex", "json_schema"]))
            if kind == "json_object":
                r.response_format.json_object = True
            elif kind == "regex":
                r.response_format.regex = draw(st.sampled_from(["[a-z]{1,4}", "(yes|no)", "[0-9]+"]))
            elif kind == "json_schema":
                r.response_format.json_schema = '{"type": "object", "properties": {"a": {"type": "integer"}}}'
            return
        kind = draw(st.sampled_from(["schema", "not_json", "regex", "grammar", "huge", "object_false", "unset"]))
        if kind == "schema":  # random JSON Schema-ish documents: many do not compile, some do
            r.response_format.json_schema = draw(json_values.map(json.dumps))
        elif kind == "not_json":
            r.response_format.json_schema = draw(st.text(max_size=60))
        elif kind == "regex":  # most random text is no regex, or a regex of odd shape
            r.response_format.regex = draw(st.text(max_size=40))
        elif kind == "grammar":
            r.response_format.grammar = draw(st.text(max_size=60).map(lambda t: "start: " + t))
        elif kind == "huge":  # around the 64 KiB limit: many alternatives, or deep nesting
            n = draw(st.integers(1000, 12000))
            r.response_format.grammar = draw(st.sampled_from([
                "start: " + " | ".join(f'"w{i}"' for i in range(n)),
                "start: " + "(" * (n // 10) + '"x"' + ")" * (n // 10)]))  # fmt: skip
        elif kind == "object_false":
            r.response_format.json_object = False
        else:
            r.response_format.SetInParent()

    @st.composite
    def requests(draw) -> pb.GenerateRequest:
        n = draw(st.sampled_from([0, 0, 1, 1, 2, 3, len(FUZZ_FIELDS)]))
        hostile = draw(st.sets(st.sampled_from(FUZZ_FIELDS), min_size=n, max_size=n))
        r = pb.GenerateRequest()
        if "request_id" in hostile:
            r.request_id = draw(st.text(max_size=140))
        prompt(r, draw, "prompt" in hostile)
        sampling(r, draw, "sampling" in hostile)
        huge = st.one_of(st.integers(context_length + 1, 2**31 - 1), st.just(-(2**31)), st.integers(-3, 0))
        r.max_new_tokens = draw(huge if "max_new_tokens" in hostile else st.integers(1, 8))
        if "stop" in hostile:
            r.stop.extend(draw(st.one_of(st.lists(st.text(max_size=300), max_size=20),
                                         st.integers(17, 5000).map(lambda n: [f"s{i}" for i in range(n)]))))  # fmt: skip
        else:
            r.stop.extend(draw(st.lists(st.text(min_size=1, max_size=8), max_size=3)))
        r.stop_token_ids.extend(draw(st.lists(token, max_size=70) if "stop_token_ids" in hostile
                                     else st.lists(in_vocab, max_size=4)))  # fmt: skip
        r.ignore_eos, r.logprobs = draw(st.booleans()), draw(st.booleans())
        speculation(r, draw, "speculation" in hostile)
        response_format(r, draw, "response_format" in hostile)
        if r.HasField("response_format") and "response_format" not in hostile:
            r.ignore_eos = False  # a plausible format with a plausible request
        r.top_logprobs = draw(st.one_of(i32, st.integers(-2, 25)) if "top_logprobs" in hostile else st.integers(0, 5))
        return r

    return requests()


def run_fuzz(address: str, cases: int, *, vocab_size: int, context_length: int, max_message_bytes: int,
             seed: int = 0, concurrency: int = 8, timeout_s: float = 120.0,
             progress: Callable[[int], None] | None = None) -> FuzzStats:  # fmt: skip
    """Send ``cases`` generated requests, ``concurrency`` at a time (Generate or GenerateStream); count outcomes."""
    import hypothesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    stats = FuzzStats()
    lock = threading.Lock()
    strategy = request_strategy(vocab_size, context_length, max_message_bytes)
    ch = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", -1)])
    stub = pb_grpc.SpecDecodeStub(ch)

    def one(r: pb.GenerateRequest, streamed: bool) -> None:
        outcome, problem = _fuzz_call(stub, r, streamed, timeout_s)
        with lock:
            stats.cases += 1
            stats.outcomes[outcome] += 1
            if problem:
                stats.bad.append(f"{problem}; request {_brief(r)}")

    @settings(max_examples=math.ceil(cases / concurrency), deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(st.tuples(strategy, st.booleans()), min_size=concurrency, max_size=concurrency))
    def batch(items) -> None:
        items = items[: cases - stats.cases]
        threads = [threading.Thread(target=one, args=item, daemon=True) for item in items]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout_s + 30)
        if progress:
            progress(stats.cases)

    try:
        hypothesis.seed(seed)(batch)()
    finally:
        ch.close()
    return stats


def _fuzz_call(stub, r: pb.GenerateRequest, streamed: bool, timeout_s: float) -> tuple[str, str | None]:
    """(outcome, problem or None): OK must be consistent, an error must be an allowed code with a message."""
    try:
        if streamed:
            msgs = list(stub.GenerateStream(r, timeout=timeout_s))
            summary = msgs[-1].summary if msgs and msgs[-1].HasField("summary") else None
            n = sum(len(m.chunk.token_ids) for m in msgs if m.HasField("chunk"))
        else:
            resp = stub.Generate(r, timeout=timeout_s)
            summary, n = resp.summary, len(resp.token_ids)
    except grpc.RpcError as e:
        code = e.code().name
        if code not in FUZZ_OK:
            return code, f"{code}: {e.details()}"
        return code, None if e.details() else f"{code} without a message"
    if summary is None:
        return "OK", "a stream ended without a summary"
    if not 1 <= n == summary.usage.completion_tokens <= r.max_new_tokens:
        return "OK", f"OK with {n} tokens, {summary.usage.completion_tokens} counted, max_new_tokens {r.max_new_tokens}"
    return "OK", None


def _brief(r: pb.GenerateRequest) -> str:
    text = str(r).replace("\n", " ")
    return text if len(text) <= 400 else text[:400] + f"... ({r.ByteSize()} bytes)"
