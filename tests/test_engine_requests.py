"""Stops, limits, streaming text, metrics and bad input at the engine level."""

from __future__ import annotations

import numpy as np
import pytest

from specdec.models import linear as fast_linear
from specdec.engine.detokenizer import Detokenizer
from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import FinishReason, GenerationRequest, Method, SamplingParams, SpeculationParams
from specdec.engine.gamma import AcceptanceEstimate, ProbeSchedule, StepCosts, analytic_bound, choose_gamma, expected_tokens

PROMPT = "Emoji: 🚀🔥 and math"


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    target = load_model(tiny_dirs["target"])
    return Engine(target, load_model(tiny_dirs["draft_same"]), EngineConfig(method=Method.DRAFT, gamma=6))


def generate(engine, **kw):
    req = GenerationRequest(prompt_ids=engine.encode(PROMPT), ignore_eos=True, **kw)
    steps = list(engine.generate(req))
    return steps


def test_stream_deltas_concatenate_to_full_decode(engine):
    steps = generate(engine, max_new_tokens=60)
    ids = [t for s in steps for t in s.token_ids]
    text = "".join(s.text for s in steps)
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert any(len(s.token_ids) > 1 for s in steps)  # multi-token steps happened
    for s in steps[:-1]:
        assert "\ufffd" not in s.text or "\ufffd" in engine.tokenizer.decode(ids)  # no split characters mid-stream
        s.text.encode("utf-8")


def test_stop_string_straddling_a_multi_token_step(engine):
    steps = generate(engine, max_new_tokens=60)
    ref_ids = [t for s in steps for t in s.token_ids]
    full = engine.tokenizer.decode(ref_ids, skip_special_tokens=True)
    # A step that emitted several tokens: take a stop string spanning two of its tokens.
    pos = 0
    for s in steps:
        if len(s.token_ids) >= 3:
            break
        pos += len(s.token_ids)
    prefix = engine.tokenizer.decode(ref_ids[: pos + 1], skip_special_tokens=True)
    upto = engine.tokenizer.decode(ref_ids[: pos + 3], skip_special_tokens=True)
    stop = upto[len(prefix) - 1 :]
    assert len(stop) >= 2 and full.find(stop) >= 0
    cut = full.find(stop)
    out = generate(engine, max_new_tokens=60, stop=[stop])
    text = "".join(s.text for s in out)
    ids = [t for s in out for t in s.token_ids]
    assert text == full[:cut]
    assert out[-1].finish_reason == FinishReason.STOP_SEQUENCE and out[-1].matched_stop == stop
    # No token after the one that completed the stop.
    assert ids == ref_ids[: len(ids)]
    assert stop in engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert stop not in engine.tokenizer.decode(ids[:-1], skip_special_tokens=True)


def test_stop_token_and_eos(engine):
    ref = [t for s in generate(engine, max_new_tokens=30) for t in s.token_ids]
    stop_tok = ref[7]
    out = generate(engine, max_new_tokens=30, stop_token_ids=[stop_tok])
    ids = [t for s in out for t in s.token_ids]
    assert ids == ref[: ref.index(stop_tok) + 1]
    assert out[-1].finish_reason == FinishReason.STOP_TOKEN


def test_metrics_and_logprobs(engine):
    req = GenerationRequest(prompt_ids=engine.encode(PROMPT), max_new_tokens=40, ignore_eos=True, logprobs=True)
    seq = engine.start(req)
    outs = []
    while not seq.finished:
        outs += engine.step_batch([seq])
    m = seq.metrics
    assert m.completion_tokens == 40 == len(seq.output_ids)
    assert m.proposed >= m.accepted > 0
    assert m.acceptance_rate == m.accepted / m.proposed
    assert m.mean_accepted_length == m.step_tokens / m.verify_steps > 1.0
    assert m.per_position_acceptance[0] == m.per_position_accepted[0] / m.per_position_proposed[0]
    assert m.ttft_s is not None and m.ttft_s >= 0
    assert min(m.draft_s, m.target_s, m.kernel_s, m.other_s) >= 0
    lps = [x for o in outs for x in o.logprobs]
    assert len(lps) == 40 and all(x <= 0 for x in lps)


BAD = [
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt_ids=[1] * 500, max_new_tokens=100), "context length"),
    (dict(prompt_ids=[1], stop_token_ids=[10**6]), "stop_token_ids[0]"),
    (dict(prompt_ids=[1], stop_token_ids=[-1]), "stop_token_ids[0]"),
    (dict(prompt_ids=[10**6]), "prompt_token_ids[0]"),
    (dict(prompt_ids=[1], sampling=SamplingParams(temperature=-1)), "sampling.temperature"),
    (dict(prompt_ids=[1], sampling=SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (dict(prompt_ids=[1], sampling=SamplingParams(top_p=1.5)), "sampling.top_p"),
    (dict(prompt_ids=[1], sampling=SamplingParams(top_p=0.0)), "sampling.top_p"),
    (dict(prompt_ids=[1], sampling=SamplingParams(top_k=-1)), "sampling.top_k"),
    (dict(prompt_ids=[1], sampling=SamplingParams(min_p=1.0)), "sampling.min_p"),
    (dict(prompt_ids=[1], speculation=SpeculationParams(gamma=99)), "speculation.gamma"),
    (dict(prompt_ids=[1], stop=[""]), "stop[0]"),
]


@pytest.mark.parametrize("kwargs,field", BAD, ids=[f for _, f in BAD])
def test_bad_requests_name_the_field(engine, kwargs, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[").replace("]", r"\]")):
        engine.start(GenerationRequest(**kwargs))


def test_tokenizer_mismatch_is_rejected(tiny_dirs):
    with pytest.raises(ValueError, match="do not share a tokenizer") as err:
        Engine(load_model(tiny_dirs["target"]), load_model(tiny_dirs["small_draft"]))
    assert tiny_dirs["target"] in str(err.value) and tiny_dirs["small_draft"] in str(err.value)


def test_method_draft_needs_a_draft_model(tiny_dirs):
    engine = Engine(load_model(tiny_dirs["target"]), None, EngineConfig(method=Method.NGRAM))
    with pytest.raises(ValueError, match="speculation.method"):
        engine.start(GenerationRequest(prompt_ids=[1], speculation=SpeculationParams(method=Method.DRAFT)))


def test_detokenizer_holds_back_possible_stop_prefix(engine):
    tok = engine.tokenizer
    ids = tok.encode("abc STOP def")
    det = Detokenizer(tok, ["STOP"])
    released = "".join(det.add(i) for i in ids)
    assert released == "abc " and det.matched_stop == "STOP" and det.text == "abc "


def test_policy_bound_and_choice():
    assert expected_tokens(0.0, 4) == 1.0
    assert expected_tokens(1.0, 4) == 5.0
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert analytic_bound(0.8, 4, 0.25) == pytest.approx((1 - 0.8**5) / 0.2 / 2.0)
    costs = StepCosts(flat_tokens=16)
    costs.record_target(1, 1.0)
    # A useless draft: speculating only costs time.
    assert choose_gamma([0.0], 0.3, costs.target_cost, 8) == 0
    # A perfect, cheap draft with a flat verify cost: draft as far as allowed.
    assert choose_gamma([0.99], 0.01, costs.target_cost, 8) == 8
    # Memory-bound up to 8 tokens, then compute-bound: a batch of 8 rows must not speculate.
    for m in range(2, 80):
        costs.record_target(m, 1.0 if m <= 8 else m / 8)
    assert choose_gamma([0.8], 0.05, costs.target_cost, 8) == 7
    assert choose_gamma([0.8] * 8, 0.05, costs.target_cost, 8) == 0


def test_unmeasured_verify_sizes_are_flat_up_to_the_kernel_rows_then_grow():
    costs = StepCosts(flat_tokens=16)
    costs.record_target(8, 1.0)
    assert costs.target_cost(8) == costs.target_cost(16) == 1.0  # memory-bound: try larger γ
    assert costs.target_cost(32) == pytest.approx(2.0) and costs.target_cost(72) == pytest.approx(4.5)
    costs.record_target(40, 3.0)
    assert costs.target_cost(40) == 3.0 and costs.target_cost(80) == pytest.approx(6.0)
    assert costs.target_cost(4) == 1.0  # below every measurement: the smallest one
    # A batch of 8 with α = 0.8 and a cheap draft: γ stays within what a flat verify allows.
    assert choose_gamma([0.8] * 8, 0.05, costs.target_cost, 8) == 1


def test_a_batch_of_8_is_not_tempted_into_a_second_pass_over_the_weights(tiny_dirs):
    """Past ROWS_PER_PASS rows the kernel adds compute, so before 16 tokens are measured the engine must not take
    8 rows at γ = 1 to cost one decode step. The control is a flat estimate up to 16 tokens: with it the same batch
    drafts (run 8's concurrency benchmark did so at 8 streams and measured 0.94x the baseline; run 10, flat up to
    the kernel's 32-row limit, 0.84x)."""
    engine = Engine(load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.DRAFT))
    assert engine.costs.flat_tokens == fast_linear.ROWS_PER_PASS == 8
    old = StepCosts(flat_tokens=16)
    for costs in engine.costs, old:
        costs.record_target(8, 0.45)  # a decode step of 8 rows
        costs.record_draft(8, 0.06)
    choice = lambda costs: choose_gamma([0.85] * 8, costs.draft_cost(8), costs.target_cost, 8)  # noqa: E731
    assert choice(engine.costs) == 0
    assert choice(old) >= 1


def test_a_batch_size_is_costed_from_its_own_forwards_once_it_has_any():
    """8 tokens as 8 rows' decode step cost more than as one row's verify (each row attends to its own cache). A
    batch of 4 at γ = 1 (8 tokens) must be costed from batch 4's own forwards (flat up to 8 tokens), not from the
    8-row decode steps that share its token count: the control, the tokens-only table, declines to draft."""
    costs = StepCosts()
    costs.record_target(8, 0.39, rows=1)  # one stream's γ = 7 verify
    for _ in range(5):
        costs.record_target(8, 0.48, rows=8)  # 8 streams' decode steps, the latest samples at 8 tokens
    costs.record_target(4, 0.33, rows=4)
    costs.record_draft(4, 0.05)
    assert costs.target_cost(8, rows=4) == 0.33 and costs.target_cost(8) == 0.48
    assert costs.target_cost(12, rows=4) == pytest.approx(0.33 * 12 / 8)
    assert costs.target_cost(8, rows=2) == 0.48  # no forward of 2 rows yet: every batch size's table
    choice = lambda rows: choose_gamma([0.55] * 4, 0.05, lambda m: costs.target_cost(m, rows), 8)  # noqa: E731
    assert choice(4) >= 1
    assert choice(None) == 0


@pytest.mark.parametrize("true_alpha", [0.5, 0.8, 0.95])
def test_acceptance_estimate_is_unbiased_under_truncation(true_alpha):
    """Steps stop at the first rejection. The estimate must recover α anyway; accepted ÷ proposed must not
    (the negative control: it is the biased estimator the policy used to have)."""
    rng = np.random.default_rng(0)
    est = AcceptanceEstimate(prior_weight=1e-9, decay=1.0)
    proposed_total = accepted_total = 0
    for _ in range(20000):
        accepted = 0
        while accepted < 8 and rng.random() < true_alpha:
            accepted += 1
        est.update(8, accepted)
        proposed_total, accepted_total = proposed_total + 8, accepted_total + accepted
    assert est.alpha == pytest.approx(true_alpha, abs=0.01)
    assert abs(accepted_total / proposed_total - true_alpha) > 0.05


def test_probes_back_off_while_rejected_and_reset_when_accepted():
    probe = ProbeSchedule(first=4, most=16)

    def steps_until_probe() -> int:
        for n in range(1, 100):
            if probe.gamma(0) == 1:
                return n
        raise AssertionError("no probe")

    assert steps_until_probe() == 4
    probe.record(1, 0)  # rejected: wait twice as long
    assert steps_until_probe() == 8
    probe.record(1, 0)
    assert steps_until_probe() == 16
    probe.record(1, 0)
    assert steps_until_probe() == 16  # capped
    probe.record(1, 1)  # accepted: back to the first wait
    assert steps_until_probe() == 4
    assert probe.gamma(3) == 3 and probe.streak == 0  # a chosen γ > 0 passes through and restarts the count
    probe.record(0, 0)  # a step that drafted nothing is not the probe's outcome
    assert probe.probing
    probe.record(1, 0)
    assert not probe.probing and probe.wait == 8


def test_a_new_request_starts_from_the_drafters_recent_alpha_when_lower(tiny_dirs):
    target = load_model(tiny_dirs["target"])
    engine = Engine(target, load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.DRAFT, gamma=4))
    first = engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT), max_new_tokens=40, ignore_eos=True))
    assert first.alpha.alpha == pytest.approx(0.6)  # nothing measured yet: the fixed prior
    while not first.finished:
        engine.step_batch([first])
    shared = engine._shared_alpha[Method.DRAFT].alpha
    assert first.metrics.alpha < 0.5 and shared < 0.5  # the unrelated draft is mostly rejected
    second = engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT), max_new_tokens=8, ignore_eos=True))
    assert second.alpha.alpha == pytest.approx(shared)
    ngram = engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT), max_new_tokens=8, ignore_eos=True,
                                           speculation=SpeculationParams(method=Method.NGRAM)))  # fmt: skip
    assert ngram.alpha.alpha == pytest.approx(0.6)  # another drafter's record is its own
    engine._shared_alpha[Method.DRAFT] = AcceptanceEstimate(prior=0.95)  # after easy prompts
    third = engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT), max_new_tokens=8, ignore_eos=True))
    assert third.alpha.alpha == pytest.approx(0.6)  # a high record never makes a new request bolder


def test_step_costs_shrug_off_a_spike_follow_a_lasting_change_and_stay_monotone():
    costs = StepCosts()
    for _ in range(4):
        costs.record_target(5, 0.3)
    costs.record_target(5, 3.0)  # one slow step (a neighbour's burst)
    assert costs.target_cost(5) == 0.3
    for _ in range(3):
        costs.record_target(5, 1.0)  # the machine really got slower
    assert costs.target_cost(5) == 1.0
    costs.record_target(8, 0.4)
    costs.record_target(3, 0.9)  # measured once, during a burst: a verify over fewer tokens never costs more
    assert costs.target_cost(3) == 0.4


def test_a_draft_that_fell_behind_pays_its_catch_up_once_over_the_tokens_left():
    costs = StepCosts()
    costs.record_target(1, 0.3)
    costs.record_target(4, 0.3)
    costs.record_target(8, 0.33)
    for tokens, seconds in ((4, 0.05), (48, 0.4)):
        costs.record_draft(tokens, seconds)
    choose = lambda catch_up: choose_gamma([0.85] * 4, costs.draft_cost(4), costs.target_cost, 8, catch_up)  # noqa: E731
    assert choose(None) > 0  # caught up: drafting pays in this batch
    assert choose([(costs.draft_cost(48), 1000)] * 4) > 0  # a long request amortises the catch-up
    assert choose([(costs.draft_cost(48), 3)] * 4) == 0  # three tokens left: the catch-up is never paid back
    assert costs.draft_cost(96) == pytest.approx(0.8)  # past the largest measurement: grows with the tokens


def test_a_batch_whose_verify_is_compute_bound_never_drafts_not_even_to_probe(tiny_dirs):
    """γ = 0 for cost, not for α: probing would only pay the draft's catch-up. The control: the same batch
    with a flat verify cost, where γ = 0 comes only from a poor α, still probes."""
    target = load_model(tiny_dirs["target"])
    engine = Engine(target, load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.DRAFT))

    def drafts_made(verify_seconds) -> int:
        engine.costs = StepCosts()
        for tokens in range(1, 80):
            engine.costs.record_target(tokens, verify_seconds(tokens))
            engine.costs.record_draft(tokens, 0.002 * tokens)
        engine.costs.record_target = engine.costs.record_draft = lambda *measured: None  # the table stays as set
        for drafter in engine._drafters.values():
            if hasattr(drafter, "costs"):
                drafter.costs = engine.costs
        seqs = [engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT + str(i)), max_new_tokens=40,
                                               ignore_eos=True)) for i in range(4)]  # fmt: skip
        for s in seqs:
            s.alpha = AcceptanceEstimate(prior=0.05)  # a poor draft's record
        while not all(s.finished for s in seqs):
            engine.step_batch([s for s in seqs if not s.finished])
        return sum(s.metrics.proposed for s in seqs)

    assert drafts_made(lambda tokens: 0.1 * tokens) == 0
    assert drafts_made(lambda tokens: 0.1) > 0
