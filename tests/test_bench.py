"""The benchmark's arithmetic: speedup is the ratio of measured rates, never a function of acceptance; the
bound is E(α,γ)/(γc+1); warm-up is excluded. First on synthetic measurements with known answers, then on a
real run of tiny models, recomputing every summary number from the raw per-prompt timings."""

from __future__ import annotations

import argparse
import json
import math
import statistics

import pytest

from specdec import bench
from specdec.bench import concurrency, runners
from specdec.engine.gamma import analytic_bound
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams

# ---- synthetic measurements ---------------------------------------------------------------------


def run(n, ttft, wall, *, proposed=0, accepted=0, tested=None, steps=None, c=None, ids=None, pp=None, pa=None):
    r = runners.rates(n, ttft, wall)
    r.update(
        output_ids=ids if ids is not None else list(range(n)),
        text="",
        proposed=proposed,
        accepted=accepted,
        tested=tested if tested is not None else accepted,
        verify_steps=steps if steps is not None else n,
        per_position_proposed=pp or [],
        per_position_accepted=pa or [],
        draft_s=0.1,
        target_s=1.0,
        prefill_s=0.5,
        kernel_s=0.01,
        other_s=0.01,
        c=c,
    )
    return r


CONFIG = {"gamma": 4, "gamma_max": 8, "max_new_tokens": 11}


def entry(i, phase, base, spec, hf=None):
    e = {"index": i, "phase": phase, "category": "x", "prompt": f"p{i}", "prompt_tokens": 5,
         "order": ["baseline", "speculative"], "baseline": base, "speculative": spec}  # fmt: skip
    if hf is not None:
        e["hf_assisted"], e["hf_target_only"] = hf
    return e


def synthetic(accepted=(8, 8, 8), spec_decode_s=(2.0, 5.0, 4.0), warm_spec_decode_s=0.001, hf=False, ids=None):
    """11 tokens each (10 decode tokens); baseline decodes at 2.0, 1.0 and 4.0 tok/s."""
    base_decode_s = (5.0, 10.0, 2.5)
    results = [
        entry(0, "warmup", run(11, 9.0, 9.0 + 100.0), run(11, 0.0, warm_spec_decode_s, proposed=10, accepted=10, c=0.5))
    ]
    for i, (bd, sd, a) in enumerate(zip(base_decode_s, spec_decode_s, accepted), start=1):
        # Two of the four steps ended in a rejection: 2 more drafts tested than accepted.
        spec = run(11, 0.5, 0.5 + sd, proposed=10, accepted=a, tested=min(a + 2, 10), steps=4, c=0.25 + 0.05 * (i - 2),
                   ids=ids[i - 1] if ids else None, pp=[4, 3, 3], pa=[3, 3, a - 6])  # fmt: skip
        hf_runs = (run(11, 0.5, 0.5 + 2 * sd), run(11, 0.5, 0.5 + bd)) if hf else None
        results.append(entry(i, "measure", run(11, 0.5, 0.5 + bd), spec, hf_runs))
    return results


def test_speedup_is_the_ratio_of_the_median_measured_decode_rates():
    report = bench.make_report(CONFIG, synthetic(), greedy=True)
    # baseline rates 2, 1, 4 → median 2; speculative rates 5, 2, 2.5 → median 2.5
    assert report["baseline"]["decode_tokens_per_s"] == pytest.approx(2.0)
    assert report["speculative"]["decode_tokens_per_s"] == pytest.approx(2.5)
    assert report["speedup"] == pytest.approx(1.25)
    assert [r["speedup"] for r in report["per_prompt"]] == pytest.approx([2.5, 2.0, 0.625])
    assert report["speedup_per_prompt_median"] == pytest.approx(2.0)
    # e2e: 11 / (0.5 + d)
    assert report["baseline"]["e2e_tokens_per_s"] == pytest.approx(11 / 5.5)
    assert report["baseline"]["ttft_s_median"] == pytest.approx(0.5)
    assert report["baseline"]["decode_tokens_per_s_pooled"] == pytest.approx(30 / 17.5)


def test_rates_count_tokens_after_the_first_emission():
    r = runners.rates(11, 1.0, 3.0, first_tokens=3)  # assisted generation: 3 tokens in its first step
    assert (r["decode_tokens_per_s"], r["e2e_tokens_per_s"], r["decode_s"]) == (4.0, 11 / 3.0, 2.0)
    assert math.isnan(runners.rates(5, 1.0, 1.0, first_tokens=5)["decode_tokens_per_s"])


def test_speedup_does_not_depend_on_acceptance_only_on_time():
    a = bench.make_report(CONFIG, synthetic(accepted=(8, 8, 8)), greedy=True)
    b = bench.make_report(CONFIG, synthetic(accepted=(10, 10, 10)), greedy=True)
    assert a["speedup"] == b["speedup"]
    assert a["speculative"]["acceptance_rate"] == pytest.approx(0.8)
    assert b["speculative"]["acceptance_rate"] == pytest.approx(1.0)
    slower = bench.make_report(CONFIG, synthetic(spec_decode_s=(4.0, 10.0, 8.0)), greedy=True)
    assert slower["speedup"] == pytest.approx(a["speedup"] / 2)


def test_warmup_is_reported_but_excluded():
    report = bench.make_report(CONFIG, synthetic(warm_spec_decode_s=1e-6), greedy=True)
    assert [r["index"] for r in report["per_prompt"]] == [1, 2, 3]
    assert [r["index"] for r in report["warmup"]] == [0]
    assert report["warmup"][0]["speedup"] > 1e4  # absurd, and nowhere in the summary
    assert report["speculative"]["proposed"] == 30
    assert report["speculative"]["tokens"] == 33


def test_bound_formula_at_fixed_gamma():
    # α = 24/30 = 0.8, γ = 4, c = median(0.2, 0.25, 0.3) = 0.25: E = (1 − 0.8^5)/(1 − 0.8) = 3.3616, bound = E/2
    report = bench.make_report(CONFIG, synthetic(), greedy=True)
    assert report["c"] == pytest.approx(0.25)
    assert report["bound_gamma"] == 4
    assert report["expected_tokens_per_step"] == pytest.approx(3.3616)
    assert report["analytic_bound"] == pytest.approx(1.6808)
    assert report["efficiency"] == pytest.approx(1.25 / 1.6808)
    # target_s 1.0 per prompt over its 4 steps, the first of which is the prefill (timed in prefill_s)
    assert report["verify_step_s"] == pytest.approx(3.0 / 9) and report["per_prompt"][0]["verify_step_s"] == pytest.approx(1 / 3)
    row = report["per_prompt"][0]  # α 0.8, c 0.2
    assert row["analytic_bound"] == pytest.approx(3.3616 / 1.8)


def test_bound_for_an_adaptive_policy_is_the_best_gamma():
    bound, gamma = bench.bound_for(0.8, 0.25, None, 8)
    by_gamma = {g: (1 - 0.8 ** (g + 1)) / 0.2 / (g * 0.25 + 1) for g in range(9)}
    assert gamma == max(by_gamma, key=by_gamma.get) == 3
    assert bound == pytest.approx(by_gamma[3])
    # With a useless draft the best is not to draft: bound 1.
    assert bench.bound_for(0.0, 0.5, None, 8) == (pytest.approx(1.0), 0)
    assert bench.bound_for(1.0, 0.0, 5, 8)[0] == pytest.approx(6.0)
    assert bench.bound_for(0.9, None, 5, 8) == (None, None)


def test_acceptance_summaries_pool_counts():
    report = bench.make_report(CONFIG, synthetic(accepted=(8, 9, 10)), greedy=True)
    s = report["speculative"]
    assert s["acceptance_rate"] == pytest.approx(27 / 30)
    assert s["mean_accepted_length"] == pytest.approx(33 / 12)
    # positions: proposed 4,3,3 per prompt; accepted 3,3,(a−6)
    assert s["per_position_acceptance"] == pytest.approx([9 / 12, 9 / 9, 9 / 9])


def test_bound_takes_alpha_over_tested_drafts_not_over_proposed():
    # Each prompt: 10 drafts proposed, 4 accepted, then one rejection ended the step; 5 never tested.
    results = synthetic()
    for e in results:
        e["speculative"].update(proposed=10, accepted=4, tested=5)
    report = bench.make_report(CONFIG, results, greedy=True)
    s = report["speculative"]
    assert s["acceptance_rate"] == pytest.approx(0.4) and s["alpha"] == pytest.approx(0.8)
    assert report["analytic_bound"] == pytest.approx(analytic_bound(0.8, 4, report["c"]))
    assert report["analytic_bound"] != pytest.approx(analytic_bound(0.4, 4, report["c"]))


def test_identical_outputs_and_hf_ratios():
    same = bench.make_report(CONFIG, synthetic(hf=True), greedy=True)
    assert same["identical_outputs"] is True and same["hf_identical_outputs"] is True
    # HF assisted took twice as long as speculative on every prompt.
    assert same["hf_assisted"]["decode_tokens_per_s"] == pytest.approx(1.25)
    assert same["speedup_vs_hf"] == pytest.approx(2.0)
    assert same["baseline_vs_hf_target_only"] == pytest.approx(1.0)
    differ = bench.make_report(CONFIG, synthetic(ids=[list(range(11)), [0] * 11, list(range(11))]), greedy=True)
    assert differ["identical_outputs"] is False
    assert [r["identical"] for r in differ["per_prompt"]] == [True, False, True]
    assert bench.make_report(CONFIG, synthetic(), greedy=False)["identical_outputs"] is None


# ---- prompts, options, CLI ----------------------------------------------------------------------


def test_builtin_prompts_cover_the_required_kinds():
    prompts = bench.builtin_prompts()
    assert prompts[0].category == "warm-up" and len(prompts) - 1 >= 10
    cats = {p.category for p in prompts[1:]}
    assert {"code", "chat", "summarise (quote)", "math"} <= cats
    assert len({p.text for p in prompts}) == len(prompts)


def test_read_prompts_lines_and_jsonl(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text('plain one\n\n{"prompt": "from json", "category": "code"}\n  spaced  \n', encoding="utf-8")
    assert bench.read_prompts(f) == [bench.Prompt("plain one"), bench.Prompt("from json", "code"), bench.Prompt("  spaced  ")]
    f.write_text('{"text": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"p.txt:1: .*'prompt'"):
        bench.read_prompts(f)
    f.write_text('{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="invalid JSON"):
        bench.read_prompts(f)
    f.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no prompts"):
        bench.read_prompts(f)


def test_cli_arguments_make_options(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n", encoding="utf-8")
    args = parser.parse_args(["--target", "T", "--draft", "D", "--max-new-tokens", "16", "--prompts-file", str(f),
                              "--json", "o.json", "--plot", "o.png", "--compare-hf", "--temperature", "0.7",
                              "--gamma-max", "5"])  # fmt: skip
    o = bench.options_from_args(args)
    assert [p.text for p in o.prompts] == ["a", "b"] and o.max_new_tokens == 16 and o.compare_hf
    assert o.sampling == SamplingParams(temperature=0.7) and o.gamma is None and o.gamma_max == 5
    assert o.method == Method.DRAFT and args.json_path == "o.json" and args.plot_path == "o.png"
    with pytest.raises(SystemExit):
        parser.parse_args(["--gamma", "3", "--gamma-max", "5"])
    with pytest.raises(ValueError, match="warmup"):
        bench.BenchOptions(prompts=[bench.Prompt("x")], warmup=1).validate()
    with pytest.raises(ValueError, match="speculation.gamma"):
        bench.BenchOptions(gamma=99).validate()


# ---- a real run on tiny models ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_engine(tiny_dirs):
    from specdec.engine import Engine, EngineConfig

    return Engine.load(tiny_dirs["target"], tiny_dirs["draft_other"], dtype="float32", draft_dtype="float32",
                       device="cpu", config=EngineConfig(gamma=3))  # fmt: skip


PROMPTS = [bench.Prompt("def add(a, b):", "code"), bench.Prompt("The quick brown fox", "chat"),
           bench.Prompt("import numpy as np", "code"), bench.Prompt("Café crème", "chat")]  # fmt: skip


def test_tiny_model_report_is_its_own_measurements(tiny_engine, tmp_path):
    events = []
    options = bench.BenchOptions(prompts=PROMPTS, max_new_tokens=12, gamma=3, compare_hf=True, hf_target_only=True,
                                 chat=False)  # fmt: skip
    report = bench.run_benchmark(tiny_engine, options, events.append)
    rows = report["per_prompt"]
    assert len(rows) == 3 and len(report["warmup"]) == 1
    # Every method generated exactly N tokens on every prompt.
    for r in rows + report["warmup"]:
        for name in ("baseline", "speculative", "hf_assisted", "hf_target_only"):
            assert r[name]["tokens"] == 12 and len(r[name]["output_ids"]) == 12
    # Recompute the summary from the raw per-prompt timings.
    assert all(r[name]["first_tokens"] == 1 for r in rows for name in ("baseline", "speculative", "hf_target_only"))
    for name in ("baseline", "speculative", "hf_assisted", "hf_target_only"):
        rates = [(12 - r[name]["first_tokens"]) / (r[name]["wall_s"] - r[name]["ttft_s"]) for r in rows]
        assert report[name]["decode_tokens_per_s"] == pytest.approx(statistics.median(rates), rel=1e-12)
        assert report[name]["ttft_s_median"] == pytest.approx(statistics.median(r[name]["ttft_s"] for r in rows))
        assert report[name]["e2e_tokens_per_s"] == pytest.approx(statistics.median(12 / r[name]["wall_s"] for r in rows))
    assert report["speedup"] == pytest.approx(report["speculative"]["decode_tokens_per_s"] / report["baseline"]["decode_tokens_per_s"])
    assert report["speedup_vs_hf"] == pytest.approx(report["speculative"]["decode_tokens_per_s"] / report["hf_assisted"]["decode_tokens_per_s"])
    # The bound, from the reported α, γ and c.
    alpha = sum(r["speculative"]["accepted"] for r in rows) / sum(r["speculative"]["tested"] for r in rows)
    assert report["speculative"]["alpha"] == pytest.approx(alpha)
    c = report["c"]
    assert c == pytest.approx(statistics.median(r["c"] for r in rows)) and c > 0
    assert report["analytic_bound"] == pytest.approx((1 - alpha**4) / (1 - alpha) / (3 * c + 1))
    assert report["efficiency"] == pytest.approx(report["speedup"] / report["analytic_bound"])
    # Greedy: speculative output is the baseline's, token for token, and so is transformers'.
    assert report["identical_outputs"] is True and report["hf_identical_outputs"] is True
    # Interleaved order rotates per prompt.
    assert [r["order"][0] for r in report["warmup"] + rows] == ["baseline", "speculative", "hf_assisted", "hf_target_only"]
    # Progress: a start and a done event per run, then finished.
    assert sum(e["event"] == "done" for e in events) == 16 and events[-1]["event"] == "finished"
    assert json.loads(bench.to_json(report))["config"]["max_new_tokens"] == 12
    md = bench.to_markdown(report)
    assert "**speedup**" in md and "analytic bound" in md and "(warm-up)" in md
    bench.plot(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tiny_model_identical_draft_accepts_everything(tiny_dirs):
    from specdec.engine import Engine, EngineConfig

    engine = Engine.load(tiny_dirs["target"], tiny_dirs["draft_same"], dtype="float32", draft_dtype="float32",
                         device="cpu", config=EngineConfig(gamma=4))  # fmt: skip
    options = bench.BenchOptions(prompts=PROMPTS[:2], max_new_tokens=11, gamma=4, chat=False)
    report = bench.run_benchmark(engine, options)
    s = report["speculative"]
    assert s["acceptance_rate"] == 1.0 and s["per_position_acceptance"] == [1.0] * 4
    # 11 tokens: the prefill step emits 1, then two steps of 5: three verify steps.
    assert s["verify_steps"] == 3 and s["mean_accepted_length"] == pytest.approx(11 / 3)
    # The prefill is timed apart: the verify cost is target time over the two decode steps only.
    assert s["prefill_s"] > 0 and report["verify_step_s"] == pytest.approx(s["target_s"] / 2)
    assert report["bound_gamma"] == 4
    assert report["analytic_bound"] == pytest.approx(5 / (4 * report["c"] + 1))
    assert report["identical_outputs"] is True


def test_sampling_run_has_no_identity_claim(tiny_engine):
    options = bench.BenchOptions(prompts=PROMPTS[:2], max_new_tokens=8, sampling=SamplingParams(temperature=0.8, seed=7),
                                 gamma_max=4, chat=False)  # fmt: skip
    report = bench.run_benchmark(tiny_engine, options)
    assert report["identical_outputs"] is None
    assert report["config"]["sampling"]["temperature"] == 0.8
    assert report["config"]["gamma_policy"] == "adaptive, γ ≤ 4" and report["config"]["gamma"] is None
    assert math.isfinite(report["speedup"])


@pytest.mark.real_models
def test_real_small_model_with_ngram_drafter():
    """SmolLM2-135M (fetched) as the target, prompt lookup as the drafter, transformers' prompt lookup as peer."""
    from specdec.engine import Engine, EngineConfig
    from specdec.models.fetch import fetch

    path = fetch(["small"], progress=False)["small"]
    engine = Engine.load(str(path), None, dtype="float32", device="cpu", config=EngineConfig(method=Method.NGRAM))
    quote = "Repeat this sentence exactly: the cat sat on the mat and looked at the hat."
    options = bench.BenchOptions(prompts=[bench.Prompt("Hi!"), bench.Prompt(quote, "quote")], max_new_tokens=24,
                                 method=Method.NGRAM, compare_hf=True)  # fmt: skip
    report = bench.run_benchmark(engine, options)
    assert report["identical_outputs"] is True
    assert report["c"] == 0.0 and report["speculative"]["proposed"] > 0
    assert report["speedup"] == pytest.approx(report["speculative"]["decode_tokens_per_s"] / report["baseline"]["decode_tokens_per_s"])
    assert "the mat" in report["per_prompt"][0]["baseline"]["text"]


# ---- concurrency ----------------------------------------------------------------------------------


def test_concurrency_report_counts_every_token_and_its_ratios_are_the_measured_ones(tiny_engine, tmp_path):
    events = []
    options = bench.BenchOptions(prompts=PROMPTS, max_new_tokens=8, gamma=3, chat=False, concurrency=[1, 2, 4],
                                 requests_per_stream=2)  # fmt: skip
    report = bench.run_concurrency(tiny_engine, options, events.append)
    assert [lv["concurrency"] for lv in report["levels"]] == [1, 2, 4]
    measured = [runners.encode_prompt(tiny_engine, p, False) for p in PROMPTS[1:]]
    for lv in report["levels"]:
        n = lv["concurrency"]
        for name in ("baseline", "speculative"):
            m = lv[name]
            detail = m["requests_detail"]
            # N streams x 2 requests x 8 tokens, each request its own 8 tokens, and nothing counted twice
            assert m["requests"] == len(detail) == 2 * n and m["tokens"] == 16 * n
            assert [r["tokens"] for r in detail] == [len(r["output_ids"]) for r in detail] == [8] * (2 * n)
            assert sorted(r["request_id"] for r in detail) == sorted(f"c{n}-s{k}-r{j}" for k in range(n) for j in range(2))
            assert m["ttft_samples"] == 2 * n and m["itl_samples"] == 2 * n * 7  # every token after a request's first
            assert m["tokens_per_s"] == pytest.approx(m["tokens"] / m["wall_s"])
            assert max(r["e2e_s"] for r in detail) <= m["wall_s"] + 1e-9
            # a stream's second request was submitted when its first ended, so the wall covers them back to back
            for k in range(n):
                first, second = (r for r in detail if r["stream"] == k)
                assert first["e2e_s"] + second["e2e_s"] <= m["wall_s"] + 1e-9
            for key in ("ttft_s", "itl_s"):
                assert 0 < m[key]["p50"] <= m[key]["p99"]
            assert m["ttft_s"]["p50"] == pytest.approx(statistics.median(r["ttft_s"] for r in detail))
            assert 1 <= m["mean_batch"] <= n
        assert lv["speedup"] == pytest.approx(lv["speculative"]["tokens_per_s"] / lv["baseline"]["tokens_per_s"])
        one = report["levels"][0]
        for name in ("baseline", "speculative"):
            assert lv[f"{name}_scaling"] == pytest.approx(lv[name]["tokens_per_s"] / one[name]["tokens_per_s"])
        assert lv["speculative"]["proposed"] > 0 and lv["baseline"]["proposed"] == 0
        # greedy: speculative = baseline request for request, and each = the prompt's output alone
        assert lv["identical_outputs"] is True
        for r in lv["baseline"]["requests_detail"]:
            k, j = r["stream"], int(r["request_id"].rsplit("r", 1)[1])
            alone = runners.time_engine(tiny_engine, [GenerationRequest(measured[(k + j) % 3], 8, ignore_eos=True)])
            assert r["output_ids"] == alone[0]["output_ids"]
    assert report["identical_outputs"] is True
    assert sum(e["event"] == "done" for e in events) == 2 * 4 and events[-1]["event"] == "finished"
    text = bench.to_json(report)
    assert json.loads(text)["levels"][2]["speculative"]["tokens"] == 64
    md = bench.concurrency_to_markdown(report)
    assert "| 4 | speculative |" in md and "speculative ÷ baseline" in md and "TTFT p99" in md


def test_concurrency_identity_matches_requests_by_id_not_by_finishing_order():
    def level(order, outputs):
        detail = [{"request_id": rid, "output_ids": outputs[rid]} for rid in order]
        return {"tokens_per_s": 1.0, "requests_detail": detail}

    same = {"a": [1, 2], "b": [3, 4]}
    levels = [{"concurrency": 1, "baseline": level("ab", same), "speculative": level("ba", same)}]
    assert bench.make_concurrency_report({}, levels, greedy=True)["identical_outputs"] is True
    levels[0]["speculative"] = level("ba", {"a": [1, 2], "b": [3, 5]})
    assert bench.make_concurrency_report({}, levels, greedy=True)["identical_outputs"] is False


def test_concurrency_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--concurrency", "1,4,8", "--requests-per-stream", "3"])
    o = bench.options_from_args(args)
    assert o.concurrency == [1, 4, 8] and o.requests_per_stream == 3
    for bad in ("0,4", "a", ""):
        with pytest.raises(SystemExit):
            parser.parse_args(["--concurrency", bad])
    with pytest.raises(ValueError, match="requests_per_stream"):
        bench.BenchOptions(requests_per_stream=0).validate()
    assert concurrency.percentiles([]) == {"p50": None, "p99": None}
    assert concurrency.percentiles([1.0, 2.0, 3.0, 4.0]) == {"p50": 2.5, "p99": pytest.approx(3.97)}


def test_the_shared_prefix_scenario_reuses_the_system_prompt_and_keeps_the_outputs(tiny_engine):
    """With the cache, every measured request takes the system prompt's whole blocks from it; without it (the
    control) none; greedy outputs agree request for request, one stream and two."""
    from specdec.engine.prefix_cache import BLOCK

    options = bench.BenchOptions(prompts=PROMPTS, warmup=1, max_new_tokens=4, concurrency=[2], requests_per_stream=1)
    report = bench.run_shared_prefix(tiny_engine, options, system=" ".join(f"rule {i}: be brief." for i in range(30)))
    shared = report["config"]["shared_prefix_tokens"]
    assert shared >= 2 * BLOCK and report["identical_outputs"] is True
    assert report["single_stream"]["cached_prompt_tokens"] == [shared // BLOCK * BLOCK] * 3
    assert [r["cached_prompt_tokens"] for r in report["single_stream"]["runs"]["off"]] == [0] * 3
    assert "| TTFT, one stream (median s) |" in bench.shared_prefix_to_markdown(report)
    assert tiny_engine.prefix_cache.budget > 0  # the scenario's pauses end with it


def test_the_agent_loop_scenario_replays_the_conversation_with_identical_outputs(tiny_engine):
    """Every method decodes each turn; the answers agree, join the conversation, and the suffix drafter, which
    sees the re-sent answers, gets drafts accepted."""
    data = {"system": "Edit the text.", "turns": ["alpha beta gamma delta " * 4, "again please", "once more"]}
    report = bench.run_agent_loop(tiny_engine, bench.BenchOptions(max_new_tokens=12), data=data)
    assert report["identical_outputs"] is True and len(report["turns"]) == 3
    assert report["turns"][1]["prompt_tokens"] > report["turns"][0]["prompt_tokens"] + 12  # the answer was re-sent
    assert set(report["summary"]) == {"none", "suffix", "draft", "auto"} and report["summary"]["none"]["proposed"] == 0
    assert report["summary"]["suffix"]["accepted"] > 0
    assert "| suffix |" in bench.agent_loop_to_markdown(report)


def test_the_json_schema_scenario_validates_and_compares_methods(tiny_engine):
    """Every method decodes each schema request; the outputs agree and validate, and jump-forward verifies the
    schema's forced keys (and only where it is on)."""
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "count": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["answer", "count"], "additionalProperties": False}  # fmt: skip
    data = {"system": "Reply in JSON.", "requests": [{"prompt": "Is it?", "schema": schema},
                                                      {"prompt": "How many?", "schema": schema}]}  # fmt: skip
    report = bench.run_structured(tiny_engine, bench.BenchOptions(max_new_tokens=40), data=data)
    s = report["summary"]
    assert report["identical_outputs"] is True and set(s) == {"none", "draft", "draft-no-jump-forward", "auto"}
    assert all(m["valid"] == 2 for m in s.values())
    assert s["draft"]["forced"] > 0 and s["draft-no-jump-forward"]["forced"] == 0 and s["none"]["forced"] == 0
    assert 0 < s["none"]["grammar_share"] < 1
    assert "| draft-no-jump-forward |" in bench.structured_to_markdown(report)


def test_the_methods_scenario_runs_every_method_on_each_prompt(tiny_engine):
    """Each prompt under every method, in an order that rotates; outputs agree; warm-up prompts stay out of the summary;
    each method's suffix drafting learns only from its own runs (its cache scope), so the suffix run of a prompt never
    drafts from the hybrid's answer to it."""
    prompts = [bench.Prompt("warm up"), bench.Prompt("count: 1 2 3 4 5 6 1 2 3 4 5 6"), bench.Prompt("again: a b a b")]
    report = bench.run_methods(tiny_engine, bench.BenchOptions(prompts=prompts, warmup=1, max_new_tokens=12))
    assert report["identical_outputs"] is True and report["config"]["prompts"] == 2
    assert set(report["summary"]) == {"none", "draft", "suffix", "auto"}
    assert [row["order"][0] for row in report["prompts"]] == ["none", "draft", "suffix"]
    assert [row["warmup"] for row in report["prompts"]] == [True, False, False]
    scopes = set(tiny_engine._drafters[Method.SUFFIX].indexes)
    assert {SpeculationParams(cache_scope=f"bench-{m}").scope for m in ("suffix", "auto")} <= scopes
    md = bench.methods_to_markdown(report)
    assert "| auto |" in md and "÷ draft model" in md
