"""Every bad field gives INVALID_ARGUMENT with a message naming the field, the allowed range and the value."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from server_fixtures import ServerThread, load_engine, server, test_config, wait_until  # noqa: F401

from specdec.serving.wire import Limits
from specdec.types import Method
from specdec.v1 import specdec_pb2 as pb


def req(**kw) -> pb.GenerateRequest:
    kw.setdefault("text", "hello")
    kw.setdefault("max_new_tokens", 4)
    return pb.GenerateRequest(**kw)


def msgs(*roles: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content="hi") for r in roles])


S = pb.SamplingOptions
SP = pb.SpeculationOptions
RF = pb.ResponseFormat

# (case id, request, the expected message: exact where it is short, else a distinctive part)
BAD = [
    ("no prompt", pb.GenerateRequest(max_new_tokens=4), "prompt must be set: one of text, token_ids or messages"),
    ("empty text", req(text=""), "text must not be empty"),
    ("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids must not be empty"),
    ("token id past vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 5000])),
     "token_ids.ids[1] must be in [0, 320), got 5000"),
    ("negative token id", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[-1])), "token_ids.ids[0] must be in [0, 320), got -1"),
    ("no messages", pb.GenerateRequest(messages=pb.ChatMessages()), "messages.messages must hold at least one message, got 0"),
    ("bad role", pb.GenerateRequest(messages=msgs("user", "wizard")),
     "messages.messages[1].role must be one of system, user, assistant, tool, got 'wizard'"),
    ("chat without template", pb.GenerateRequest(messages=msgs("user")), "has no chat template"),
    ("temperature negative", req(sampling=S(temperature=-0.5)), "sampling.temperature must be in [0, 100], got -0.5"),
    ("temperature too big", req(sampling=S(temperature=1000.0)), "sampling.temperature must be in [0, 100], got 1000.0"),
    ("temperature NaN", req(sampling=S(temperature=math.nan)), "sampling.temperature must be a finite number, got nan"),
    ("temperature Inf", req(sampling=S(temperature=math.inf)), "sampling.temperature must be a finite number, got inf"),
    ("top_p above 1", req(sampling=S(top_p=1.5)), "sampling.top_p must be in (0, 1], got 1.5"),
    ("top_p zero", req(sampling=S(top_p=0.0)), "sampling.top_p must be in (0, 1], got 0.0"),
    ("top_k negative", req(sampling=S(top_k=-1)), "sampling.top_k must be in [0, 2^31 - 1] (0 = off), got -1"),
    ("min_p one", req(sampling=S(min_p=1.0)), "sampling.min_p must be in [0, 1), got 1.0"),
    ("min_p NaN", req(sampling=S(min_p=math.nan)), "sampling.min_p must be a finite number, got nan"),
    ("max_new_tokens zero", req(max_new_tokens=0), "max_new_tokens must be >= 1, got 0"),
    ("max_new_tokens negative", req(max_new_tokens=-5), "max_new_tokens must be >= 1, got -5"),
    ("past the context", req(max_new_tokens=100000),
     "prompt tokens + max_new_tokens must be <= the target's context length 512, got"),
    ("empty stop", req(stop=["ok", ""]), "stop[1] must be a non-empty string"),
    ("too many stops", req(stop=[f"s{i}" for i in range(17)]), "stop must hold at most 16 strings, got 17"),
    ("stop too long", req(stop=["x" * 300]), "stop[0] must be at most 256 characters, got 300"),
    ("stop token past vocab", req(stop_token_ids=[3, 999]), "stop_token_ids[1] must be in [0, 320), got 999"),
    ("too many stop tokens", req(stop_token_ids=list(range(65))), "stop_token_ids must hold at most 64 ids, got 65"),
    ("gamma too big", req(speculation=SP(gamma=33)), "speculation.gamma must be in [0, 32], got 33"),
    ("gamma negative", req(speculation=SP(gamma=-1)), "speculation.gamma must be in [0, 32], got -1"),
    ("gamma_max zero", req(speculation=SP(gamma_max=0)), "speculation.gamma_max must be in [1, 32], got 0"),
    ("gamma and gamma_max", req(speculation=SP(gamma=2, gamma_max=4)),
     "speculation.gamma (fixed γ) and speculation.gamma_max (adaptive γ) are exclusive, got gamma=2 and gamma_max=4"),
    ("unknown method", req(speculation=SP(method=99)),
     "speculation.method must be one of METHOD_UNSPECIFIED, METHOD_DRAFT, METHOD_NGRAM, METHOD_NONE, METHOD_SUFFIX, METHOD_AUTO, got 99"),
    ("cache_scope too long", req(speculation=SP(cache_scope="t" * 129)),
     "speculation.cache_scope must be at most 128 characters, got 129"),
    ("disable with draft", req(speculation=SP(disable=True, method=pb.METHOD_DRAFT)),
     "speculation.disable is set, so speculation.method must be METHOD_UNSPECIFIED or METHOD_NONE, got METHOD_DRAFT"),
    ("regex does not compile", req(response_format=RF(regex="a(b")),
     "response_format.regex does not compile: "),
    ("schema not JSON", req(response_format=RF(json_schema="{type: object")),
     "response_format.json_schema does not compile: "),
    ("schema of an unknown type", req(response_format=RF(json_schema='{"type": "wizard"}')),
     "response_format.json_schema does not compile: "),
    ("grammar does not compile", req(response_format=RF(grammar="start: foo")),
     "response_format.grammar does not compile: "),
    ("grammar too big", req(response_format=RF(grammar="start: " + " | ".join(f'"w{i}"' for i in range(9000)))),
     "response_format.grammar must be at most 65536 bytes, got"),
    ("empty regex", req(response_format=RF(regex="")), "response_format.regex must not be empty"),
    ("json_object false", req(response_format=RF(json_object=False)), "response_format.json_object must be true"),
    ("format unset", req(response_format=RF()), "response_format must set one of json_schema, json_object, regex, grammar"),
    ("format with ignore_eos", req(response_format=RF(json_object=True), ignore_eos=True),
     "ignore_eos cannot be used with response_format"),
    ("top_logprobs too many", req(top_logprobs=21), "top_logprobs must be in [0, 20], got 21"),
    ("top_logprobs negative", req(top_logprobs=-1), "top_logprobs must be in [0, 20], got -1"),
    ("request id too long", req(request_id="r" * 129), "request_id must be at most 128 characters, got 129"),
    ("request id not printable", req(request_id="a\nb"), "request_id must be printable ASCII (0x20-0x7e), got '\\n'"),
]  # fmt: skip


@pytest.mark.parametrize("bad,expected", [pytest.param(r, m, id=i) for i, r, m in BAD])
def test_bad_field_is_invalid_argument_naming_it(server, bad, expected):
    with pytest.raises(grpc.RpcError) as e:
        server.stub().Generate(bad, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert expected in e.value.details()
    # the stream reports the same, before any message
    with pytest.raises(grpc.RpcError) as e2:
        list(server.stub().GenerateStream(bad, timeout=30))
    assert e2.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e2.value.details() == e.value.details()


def test_table_is_big_enough_and_the_server_is_unharmed(server):
    assert len(BAD) >= 15
    assert wait_until(server.idle, 5)
    r = server.stub().Generate(req(max_new_tokens=3), timeout=30)
    assert r.summary.usage.completion_tokens == 3


@pytest.fixture(scope="module")
def server_up_to_gamma_32(tiny_dirs):
    """A server that lets requests use the API's whole γ range (--max-gamma 32)."""
    s = ServerThread(test_config(limits=Limits(max_gamma=32)), engine=load_engine(tiny_dirs))
    yield s
    s.close()


def test_edges_that_are_valid(server_up_to_gamma_32):
    """The boundaries themselves are accepted (so the table above tests the range, not a blanket rejection)."""
    stub = server_up_to_gamma_32.stub()
    for ok in (
        req(sampling=S(temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=2**64 - 1)),
        req(sampling=S(temperature=100.0, top_k=2**31 - 1, min_p=0.999, seed=0)),
        req(speculation=SP(gamma=0)),
        req(speculation=SP(gamma=32)),
        req(speculation=SP(gamma_max=32)),
        req(speculation=SP(disable=True, method=pb.METHOD_NONE)),
        req(stop=["x" * 256] * 16, stop_token_ids=list(range(64))),
        req(request_id="r" * 128),
        pb.GenerateRequest(token_ids=pb.TokenIds(ids=[0, 319] * 254), max_new_tokens=4),  # 508 + 4 = the context
    ):
        r = stub.Generate(ok, timeout=60)
        assert r.summary.usage.completion_tokens >= 1


def test_draft_method_on_a_server_without_a_draft(tiny_dirs):
    srv = ServerThread(test_config(metrics_port=None), engine=load_engine(tiny_dirs, draft=None, method=Method.NGRAM))
    try:
        with pytest.raises(grpc.RpcError) as e:
            srv.stub().Generate(req(speculation=SP(method=pb.METHOD_DRAFT)), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "speculation.method 'draft' needs a draft model" in e.value.details()
    finally:
        srv.close()


@pytest.mark.parametrize(
    "payload,expected",
    [
        (b"\x12\x02\xff\xfe", "String field had bad UTF-8"),  # text = bytes ff fe
        (b"\xff\xff\xff", "Wire format was corrupt"),
    ],
    ids=["invalid utf-8 in text", "corrupt wire format"],
)
def test_unparseable_request_is_invalid_argument(server, payload, expected):
    with grpc.insecure_channel(server.address) as ch:
        for kind in ("unary_unary", "unary_stream"):
            method = "/specdec.v1.SpecDecode/" + ("Generate" if kind == "unary_unary" else "GenerateStream")
            call = getattr(ch, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            with pytest.raises(grpc.RpcError) as e:
                result = call(payload, timeout=10)
                list(result) if kind == "unary_stream" else None
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "not a valid specdec.v1.GenerateRequest" in e.value.details() and expected in e.value.details()


# ---- fuzz: whatever the message, validation answers with ValueError (INVALID_ARGUMENT) or a request ----------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from specdec.serving.wire import parse_request  # noqa: E402

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -0.0, 0.5, 1e-45]))
i32 = st.integers(-(2**31), 2**31 - 1)
small_ids = st.lists(st.one_of(st.integers(-5, 400), i32), max_size=8)


@st.composite
def generate_requests(draw) -> pb.GenerateRequest:
    r = pb.GenerateRequest(request_id=draw(st.text(max_size=140)))
    kind = draw(st.sampled_from(["none", "text", "ids", "messages"]))
    if kind == "text":
        r.text = draw(st.text(max_size=40))
    elif kind == "ids":
        r.token_ids.SetInParent()
        r.token_ids.ids.extend(draw(small_ids))
    elif kind == "messages":
        r.messages.SetInParent()
        for role, content in draw(st.lists(st.tuples(st.sampled_from(["user", "system", "bot", ""]), st.text(max_size=10)), max_size=3)):
            r.messages.messages.add(role=role, content=content)
    for name, strat in (("temperature", floats), ("top_p", floats), ("min_p", floats), ("top_k", i32),
                        ("seed", st.integers(0, 2**64 - 1))):  # fmt: skip
        if draw(st.booleans()):
            setattr(r.sampling, name, draw(strat))
    if draw(st.booleans()):
        r.max_new_tokens = draw(st.one_of(i32, st.integers(-2, 600)))
    r.stop.extend(draw(st.lists(st.text(max_size=300), max_size=18)))
    r.stop_token_ids.extend(draw(st.lists(st.one_of(st.integers(-2, 330), i32), max_size=66)))
    r.speculation.method = draw(st.sampled_from([0, 1, 2, 3, 7, -1]))
    r.speculation.disable = draw(st.booleans())
    if draw(st.booleans()):
        r.speculation.gamma = draw(st.one_of(st.integers(-2, 40), i32))
    if draw(st.booleans()):
        r.speculation.gamma_max = draw(st.one_of(st.integers(-2, 40), i32))
    kind = draw(st.sampled_from(["", "json_schema", "regex", "grammar", "json_object"]))
    if kind == "json_object":
        r.response_format.json_object = draw(st.booleans())
    elif kind:  # random text, or a random JSON document (many schemas of the right keys do compile)
        schema_like = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-3, 50), st.text(max_size=6),
                                             st.sampled_from(["object", "string", "integer", "array"])),
                                   lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                                       st.sampled_from(["type", "properties", "items", "enum", "pattern", "maxLength"]),
                                       inner, max_size=3)), max_leaves=10)  # fmt: skip
        setattr(r.response_format, kind, draw(st.one_of(st.text(max_size=60), schema_like.map(json.dumps))))
    r.top_logprobs = draw(st.one_of(i32, st.integers(-2, 25)))
    return r


@pytest.fixture(scope="module")
def fuzz_engine(tiny_dirs):
    return load_engine(tiny_dirs)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(r=generate_requests())
def test_fuzzed_requests_give_a_request_or_a_named_value_error(fuzz_engine, r):
    try:
        seq = fuzz_engine.start(fuzz_engine.prepare(parse_request(r)))
    except ValueError as e:
        assert str(e) and not str(e).startswith("Traceback")
    else:
        assert seq.request.max_new_tokens >= 1 and len(seq.request.prompt_ids) >= 1
        fuzz_engine.release(seq)
