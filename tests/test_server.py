"""The gRPC service against a real server on 127.0.0.1 (ephemeral port) with tiny models."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import (  # noqa: F401 - fixtures
    ControlledEngine,
    ServerThread,
    chat_target_dir,
    load_engine,
    reference_engine,
    server,
    slow_server,
    test_config,
    wait_until,
)

from specdec.engine import Engine, EngineConfig
from specdec.models import isa
from specdec.serving.metrics import METRIC_NAMES
from specdec.types import FinishReason, GenerationRequest
from specdec.v1 import specdec_pb2 as pb

PROMPTS = ["Café crème, naïve façade", "漢字とかなの文章です。", "Emoji: 🚀🔥✨ and math", "def add(a, b):\n"]


def request(text: str = PROMPTS[0], n: int = 16, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(text=text, max_new_tokens=n, ignore_eos=True, **kw)


def reference(engine: Engine, text: str, n: int, **kw) -> tuple[list[int], str]:
    req = GenerationRequest(prompt_ids=engine.encode(text), max_new_tokens=n, ignore_eos=True, **kw)
    outs = list(engine.generate(req))
    return [t for o in outs for t in o.token_ids], "".join(o.text for o in outs)


def stream_all(stub, req, **kw) -> tuple[list[pb.StreamChunk], pb.CompletionSummary | None]:
    chunks, summary = [], None
    for m in stub.GenerateStream(req, **kw):
        if m.HasField("chunk"):
            assert summary is None, "a chunk after the summary"
            chunks.append(m.chunk)
        else:
            summary = m.summary
    return chunks, summary


def metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def scrape(srv: ServerThread) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=5).read().decode()


# ---- outputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", PROMPTS)
def test_unary_and_stream_identical_and_equal_to_engine(server, reference_engine, text):
    stub = server.stub()
    unary = stub.Generate(request(text, 20), timeout=30)
    chunks, summary = stream_all(stub, request(text, 20), timeout=30)
    ids, ref_text = reference(reference_engine, text, 20)

    assert list(unary.token_ids) == ids
    assert unary.text == ref_text
    assert [t for c in chunks for t in c.token_ids] == ids
    assert "".join(c.text for c in chunks) == unary.text
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert summary is not None and summary.finish_reason == pb.FINISH_REASON_LENGTH
    assert summary.usage.completion_tokens == 20 == unary.summary.usage.completion_tokens
    assert summary.usage.prompt_tokens == len(reference_engine.encode(text))
    # one chunk per verify step
    assert len([c for c in chunks if c.token_ids]) == summary.speculation.verify_steps


def test_a_chunked_prompt_streams_the_same_tokens_as_a_one_forward_prefill(tiny_dirs, reference_engine):
    srv = ServerThread(test_config(), engine=load_engine(tiny_dirs, prefill_chunk=4))
    try:
        text = " ".join(str(i) for i in range(30))
        assert len(reference_engine.encode(text)) > 3 * 4
        chunks, summary = stream_all(srv.stub(), request(text, 12), timeout=30)
        assert [c.index for c in chunks] == list(range(len(chunks)))
        assert [t for c in chunks for t in c.token_ids] == reference(reference_engine, text, 12)[0]
        assert summary is not None and summary.usage.completion_tokens == 12
    finally:
        srv.close()


def test_stream_deltas_are_whole_utf8_even_when_tokens_split_characters(server, reference_engine):
    """Byte-level tokens often end mid-character; no delta may carry half a character or a premature U+FFFD."""
    tok = reference_engine.tokenizer
    stub = server.stub()
    split_steps = 0
    for i, text in enumerate(PROMPTS):
        req = request(text, 40, sampling=pb.SamplingOptions(temperature=1.0, seed=100 + i))
        chunks, summary = stream_all(stub, req, timeout=30)
        ids = [t for c in chunks for t in c.token_ids]
        joined = "".join(c.text for c in chunks)
        # The concatenated deltas are exactly the decode of the whole output (an independent truth).
        assert joined == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for c in chunks:
            c.text.encode("utf-8", errors="strict")
            if c.token_ids and "\ufffd" in tok.decode(list(c.token_ids)) and "\ufffd" not in c.text:
                split_steps += 1
        assert summary.usage.completion_tokens == 40
    assert split_steps > 0, "the test never hit a step whose tokens end mid-character; it proves nothing"


@pytest.mark.parametrize(
    "spec",
    [
        pytest.param(pb.SpeculationOptions(gamma=3), id="fixed-gamma"),
        pytest.param(pb.SpeculationOptions(method=pb.METHOD_NONE), id="no-speculation"),
        pytest.param(pb.SpeculationOptions(), id="adaptive-gamma"),
    ],
)
def test_sampled_output_depends_on_seed_only(server, spec):
    stub = server.stub()
    req = request(PROMPTS[1], 24, sampling=pb.SamplingOptions(temperature=0.9, top_p=0.95, seed=7), speculation=spec)
    a = stub.Generate(req, timeout=30)
    b = stub.Generate(req, timeout=30)
    assert a.summary.seed == 7
    assert list(a.token_ids) == list(b.token_ids)
    unseeded = stub.Generate(request(PROMPTS[1], 4, sampling=pb.SamplingOptions(temperature=0.9)), timeout=30)
    assert unseeded.summary.seed != 0  # the server picked one and reported it


def test_concurrent_clients_all_correct(server, reference_engine):
    expected = {t: reference(reference_engine, t, 24) for t in PROMPTS}
    results: dict[str, object] = {}

    def worker(text: str) -> None:
        try:
            stub = server.stub()
            if text == PROMPTS[0]:
                chunks, _ = stream_all(stub, request(text, 24), timeout=60)
                results[text] = ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks))
            else:
                r = stub.Generate(request(text, 24), timeout=60)
                results[text] = (list(r.token_ids), r.text)
        except Exception as e:  # reported below
            results[text] = e

    threads = [threading.Thread(target=worker, args=(t,)) for t in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert results == expected
    assert wait_until(server.idle, 5)


def test_stop_string_stop_token_and_logprobs(server, reference_engine):
    stub = server.stub()
    ids, text = reference(reference_engine, PROMPTS[3], 24)
    # a stop string taken from the middle of the reference output
    clean = [i for i in range(4, len(text) - 2) if text[i : i + 2].isprintable() and "\ufffd" not in text[i : i + 2]]
    assert clean, f"no printable pair in {text!r}"
    stop = text[clean[0] : clean[0] + 2]
    r = stub.Generate(request(PROMPTS[3], 24, stop=[stop]), timeout=30)
    assert r.summary.finish_reason == pb.FINISH_REASON_STOP_SEQUENCE
    assert r.summary.matched_stop == stop
    assert r.text == text[: text.find(stop)]

    stop_id = ids[5]
    r = stub.Generate(request(PROMPTS[3], 24, stop_token_ids=[stop_id]), timeout=30)
    assert r.summary.finish_reason == pb.FINISH_REASON_STOP_TOKEN
    assert list(r.token_ids) == ids[: ids.index(stop_id) + 1]

    r = stub.Generate(request(PROMPTS[3], 12, logprobs=True), timeout=30)
    assert len(r.logprobs) == len(r.token_ids) == 12
    assert all(lp <= 1e-6 for lp in r.logprobs)
    chunks, _ = stream_all(stub, request(PROMPTS[3], 12, logprobs=True), timeout=30)
    assert [lp for c in chunks for lp in c.logprobs] == pytest.approx(list(r.logprobs))
    assert len(stub.Generate(request(PROMPTS[3], 5), timeout=30).logprobs) == 0


def test_json_schema_request_and_top_logprobs(server):
    """End to end over gRPC: the text fits the schema, the unary and streamed answers agree, and top_logprobs come
    back per token, most likely first, with each token's own logprob no higher than the first alternative's."""
    import jsonschema

    from specdec.client import build_request

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
              "ok": {"type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}  # fmt: skip
    req = build_request(PROMPTS[1], json_schema=schema, top_logprobs=3, max_new_tokens=60)
    stub = server.stub()
    r = stub.Generate(req, timeout=60)
    assert r.summary.finish_reason == pb.FINISH_REASON_EOS
    jsonschema.validate(json.loads(r.text), schema)
    assert len(r.top_logprobs) == len(r.logprobs) == len(r.token_ids)
    for lp, top in zip(r.logprobs, r.top_logprobs):
        assert 1 <= len(top.token_ids) == len(top.logprobs) <= 3
        assert list(top.logprobs) == sorted(top.logprobs, reverse=True) and lp <= top.logprobs[0] + 1e-6
    chunks, summary = stream_all(stub, req, timeout=60)
    assert "".join(c.text for c in chunks) == r.text and summary.finish_reason == pb.FINISH_REASON_EOS
    assert [list(t.token_ids) for c in chunks for t in c.top_logprobs] == [list(t.token_ids) for t in r.top_logprobs]


def test_token_id_prompt_and_speculation_options(server, reference_engine):
    stub = server.stub()
    ids, _ = reference(reference_engine, PROMPTS[2], 16)
    prompt_ids = reference_engine.encode(PROMPTS[2])
    for spec in (
        pb.SpeculationOptions(method=pb.METHOD_NONE),
        pb.SpeculationOptions(disable=True),
        pb.SpeculationOptions(method=pb.METHOD_NGRAM, gamma=3),
        pb.SpeculationOptions(method=pb.METHOD_DRAFT, gamma=4),
        pb.SpeculationOptions(gamma_max=2),
    ):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), max_new_tokens=16, ignore_eos=True, speculation=spec)
        r = stub.Generate(req, timeout=30)
        assert list(r.token_ids) == ids, spec  # greedy output is the target's whatever the drafter
        s = r.summary.speculation
        if spec.method == pb.METHOD_NONE or spec.disable:
            assert s.method == "none" and s.proposed == 0 and s.verify_steps == 16
        if spec.method == pb.METHOD_DRAFT:
            assert s.method == "draft" and s.proposed > 0
            assert s.acceptance_rate == pytest.approx(s.accepted / s.proposed)
            assert s.mean_accepted_length == pytest.approx(16 / s.verify_steps, rel=0.2)


def test_chat_messages_use_the_chat_template(chat_target_dir):
    engine = Engine.load(chat_target_dir, None, config=EngineConfig())
    ref = Engine.load(chat_target_dir, None, config=EngineConfig())
    srv = ServerThread(test_config(metrics_port=None), engine=engine)
    try:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café?"}]
        req = pb.GenerateRequest(messages=pb.ChatMessages(messages=[pb.ChatMessage(**m) for m in msgs]),
                                 max_new_tokens=8, ignore_eos=True)  # fmt: skip
        r = srv.stub().Generate(req, timeout=30)
        prompt_ids = ref.encode_chat(msgs)
        assert r.summary.usage.prompt_tokens == len(prompt_ids)
        expected = [t for o in ref.generate(GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=8, ignore_eos=True))
                    for t in o.token_ids]  # fmt: skip
        assert list(r.token_ids) == expected
        assert r.summary.speculation.method == "ngram"  # no draft model: the engine falls back to n-gram
    finally:
        srv.close()


def test_model_info(server):
    info = server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    assert info.vocab_size == 320 and info.context_length == 512
    assert info.method == pb.METHOD_DRAFT
    assert info.gamma_policy == "adaptive" and info.gamma_max == 8
    assert info.target.endswith("target") and info.draft.endswith("draft_other")
    assert info.target_dtype == "float32" and info.device == "cpu"
    assert info.max_queue == 64 and info.max_running == 8
    # Memory now, as the OS reports it (psutil), and the CPU kernels' instruction-set path.
    assert abs(info.resident_bytes - psutil.Process().memory_info().rss) < 256 << 20
    assert info.kernel_isa == (isa.ISA or "torch")


# ---- deadlines, cancellation, admission, errors ------------------------------------------------


def _seq(engine: ControlledEngine, request_id: str):
    return next(s for s in engine.stepped if s.request.request_id == request_id)


def test_deadline_stops_generation_and_frees_the_request(slow_server):
    stub = slow_server.stub()
    for rid, call in (("dl-stream", lambda r: list(stub.GenerateStream(r, timeout=0.5))),
                      ("dl-unary", lambda r: stub.Generate(r, timeout=0.5))):  # fmt: skip
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            call(request(PROMPTS[0], 400, request_id=rid))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 3
        assert wait_until(slow_server.idle, 5)
        seq = _seq(slow_server.engine, rid)
        assert seq.finished and seq.finish_reason in (FinishReason.DEADLINE, FinishReason.CANCELLED)
        assert seq.target_cache is None and seq.draft_state is None
        assert 0 < seq.metrics.completion_tokens < 400
    assert metric(scrape(slow_server), "specdec_requests_total", finish_reason="deadline") >= 1


def test_cancel_mid_stream_stops_within_a_step_and_engine_returns_to_idle(slow_server):
    stub = slow_server.stub()
    call = stub.GenerateStream(request(PROMPTS[1], 400, request_id="to-cancel"), timeout=30)
    got = 0
    for m in call:
        got += m.HasField("chunk")
        if got == 3:
            break
    assert slow_server.scheduler.running == 1
    call.cancel()
    steps_at_cancel = slow_server.engine.step_calls
    assert wait_until(slow_server.idle, 5)
    seq = _seq(slow_server.engine, "to-cancel")
    assert seq.finished and seq.finish_reason == FinishReason.CANCELLED
    assert seq.target_cache is None and seq.draft_state is None  # KV memory freed
    # stopped within one step of the cancel (the one in flight, plus at most one racing the cancel)
    assert slow_server.engine.step_calls - steps_at_cancel <= 2
    assert seq.metrics.completion_tokens < 20
    assert metric(scrape(slow_server), "specdec_requests_total", finish_reason="cancelled") == 1
    # the server carries on
    assert slow_server.stub().Generate(request(PROMPTS[1], 4), timeout=30).summary.usage.completion_tokens == 4


def test_full_queue_gives_resource_exhausted_with_retry_hint(tiny_dirs):
    engine = ControlledEngine(load_engine(tiny_dirs))
    srv = ServerThread(test_config(max_running=1, max_queue=1), engine=engine)
    try:
        engine.gate.clear()
        stub = srv.stub()
        first = stub.Generate.future(request(PROMPTS[0], 4), timeout=30)
        assert wait_until(lambda: srv.scheduler.running == 1 and engine.step_calls >= 1, 10)
        second = stub.Generate.future(request(PROMPTS[1], 4), timeout=30)
        assert wait_until(lambda: srv.scheduler.waiting == 1, 10)
        with pytest.raises(grpc.RpcError) as e:
            stub.Generate(request(PROMPTS[2], 4), timeout=30)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue 1" in e.value.details() and "retry after" in e.value.details()
        trailers = dict(e.value.trailing_metadata())
        assert int(trailers["grpc-retry-pushback-ms"]) > 0
        engine.gate.set()
        assert first.result(30).summary.usage.completion_tokens == 4
        assert second.result(30).summary.usage.completion_tokens == 4
        assert wait_until(srv.idle, 5)
        assert metric(scrape(srv), "specdec_requests_failed_total", kind="resource_exhausted") == 1
    finally:
        engine.gate.set()
        srv.close()


def test_engine_failure_is_internal_with_request_id_and_server_keeps_serving(tiny_dirs, caplog):
    engine = ControlledEngine(load_engine(tiny_dirs))
    engine.fail_ids.add("explode-1")
    srv = ServerThread(test_config(), engine=engine)
    try:
        stub = srv.stub()
        with caplog.at_level("ERROR", logger="specdec"):
            with pytest.raises(grpc.RpcError) as e:
                stub.Generate(request(PROMPTS[0], 8, request_id="explode-1"), timeout=30)
        assert e.value.code() == grpc.StatusCode.INTERNAL
        assert "explode-1" in e.value.details()
        assert any(r.exc_info and "explode-1" in r.getMessage() for r in caplog.records), "no traceback logged"
        assert wait_until(srv.idle, 5)
        assert _seq(engine, "explode-1").target_cache is None
        r = stub.Generate(request(PROMPTS[0], 8, request_id="fine"), timeout=30)
        assert r.summary.usage.completion_tokens == 8 and r.request_id == "fine"
    finally:
        srv.close()


def test_a_request_that_breaks_the_batch_step_fails_alone(tiny_dirs, reference_engine):
    """Three requests stepped together; one makes every step it is in raise. Only that one gets INTERNAL; the
    others, retried alone and then batched again, finish with exactly their reference output."""
    engine = ControlledEngine(load_engine(tiny_dirs))
    engine.fail_ids.add("explode-2")
    srv = ServerThread(test_config(max_running=4), engine=engine)
    try:
        stub = srv.stub()
        engine.gate.clear()
        first = stub.Generate.future(request(PROMPTS[0], 12, request_id="fine-1"), timeout=30)
        assert wait_until(lambda: engine.step_calls >= 1, 10)  # fine-1's first step is held at the gate
        bad = stub.Generate.future(request(PROMPTS[1], 12, request_id="explode-2"), timeout=30)
        third = stub.Generate.future(request(PROMPTS[3], 12, request_id="fine-3"), timeout=30)
        assert wait_until(lambda: srv.scheduler.waiting == 2, 10)
        engine.gate.set()
        with pytest.raises(grpc.RpcError) as e:
            bad.result(30)
        assert e.value.code() == grpc.StatusCode.INTERNAL and "explode-2" in e.value.details()
        assert list(first.result(30).token_ids) == reference(reference_engine, PROMPTS[0], 12)[0]
        assert list(third.result(30).token_ids) == reference(reference_engine, PROMPTS[3], 12)[0]
        assert wait_until(srv.idle, 5)
        assert _seq(engine, "explode-2").target_cache is None
    finally:
        engine.gate.set()
        srv.close()


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_endpoint_exposes_the_named_series_with_true_counts(tiny_dirs):
    srv = ServerThread(test_config(), engine=load_engine(tiny_dirs, draft="draft_same"))
    try:
        stub = srv.stub()
        rs = [stub.Generate(request(t, 12, speculation=pb.SpeculationOptions(gamma=3)), timeout=30) for t in PROMPTS[:3]]
        with pytest.raises(grpc.RpcError):
            stub.Generate(request(PROMPTS[0], 0), timeout=30)
        text = scrape(srv)
        samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
        for name, kind in METRIC_NAMES.items():
            wanted = name + "_count" if kind.startswith("histogram") else name
            assert wanted in samples, f"{wanted} missing from /metrics"
        assert metric(text, "specdec_draft_tokens_proposed_total") == sum(r.summary.speculation.proposed for r in rs) > 0
        assert metric(text, "specdec_draft_tokens_accepted_total") == sum(r.summary.speculation.accepted for r in rs) > 0
        assert metric(text, "specdec_generated_tokens_total") == 36
        assert metric(text, "specdec_requests_total", finish_reason="length") == 3
        assert metric(text, "specdec_requests_failed_total", kind="invalid_argument") == 1
        assert metric(text, "specdec_time_to_first_token_seconds_count") == 3
        assert metric(text, "specdec_e2e_request_latency_seconds_count") == 3
        assert metric(text, "specdec_inter_token_latency_seconds_count") == 33  # every token after the first
        assert metric(text, "specdec_requests_running") == 0 and metric(text, "specdec_requests_waiting") == 0
        assert metric(text, "specdec_sequences_holding_cache") == 0
    finally:
        srv.close()


def test_request_log_line_is_structured(server, caplog):
    with caplog.at_level("INFO", logger="specdec"):
        server.stub().Generate(request(PROMPTS[0], 5, request_id="log-me"), timeout=30)
        assert wait_until(lambda: any(getattr(r, "fields", {}).get("request_id") == "log-me" for r in caplog.records), 5)
    rec = next(r for r in caplog.records if getattr(r, "fields", {}).get("request_id") == "log-me")
    f = rec.fields
    assert f["finish_reason"] == "length" and f["completion_tokens"] == 5
    for key in ("prompt_tokens", "queue_s", "ttft_s", "e2e_s", "tokens_per_s", "acceptance_rate", "method"):
        assert key in f
    from specdec.serving.metrics import JsonFormatter

    line = json.loads(JsonFormatter().format(rec))
    assert line["request_id"] == "log-me" and line["msg"] == "request finished"


def test_oversized_message_is_resource_exhausted_and_server_continues(server):
    stub = server.stub()
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(pb.GenerateRequest(text="x" * (5 << 20), max_new_tokens=2), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.Generate(request(PROMPTS[0], 2), timeout=30).summary.usage.completion_tokens == 2


def test_a_repeated_prefix_is_reported_in_usage_and_metrics(server, reference_engine):
    """The second request behind the same 150 tokens takes their two whole blocks from the prefix cache: its usage
    says so, the metrics count the lookup and the hit, and its tokens equal a cold engine's."""
    from specdec.engine.prefix_cache import BLOCK

    stub = server.stub()
    shared = [(7 * i) % 250 + 3 for i in range(150)]
    before = scrape(server)
    first = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=shared + [11, 12]), max_new_tokens=6, ignore_eos=True), timeout=30)
    second = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=shared + [13]), max_new_tokens=6, ignore_eos=True), timeout=30)
    after = scrape(server)
    assert first.summary.usage.cached_prompt_tokens == 0  # the control: nothing cached yet
    assert second.summary.usage.cached_prompt_tokens == 2 * BLOCK
    assert metric(after, "specdec_prefix_cache_hit_tokens_total") - metric(before, "specdec_prefix_cache_hit_tokens_total") == 2 * BLOCK
    assert metric(after, "specdec_prefix_cache_queried_tokens_total") - metric(before, "specdec_prefix_cache_queried_tokens_total") == 151 + 150
    assert metric(after, "specdec_prefix_cache_bytes") > 0
    with reference_engine.prefix_cache.paused():
        cold = [t for o in reference_engine.generate(GenerationRequest(shared + [13], 6, ignore_eos=True)) for t in o.token_ids]
    assert list(second.token_ids) == cold
