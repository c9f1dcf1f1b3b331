"""Batched steps: a request's output is the same alone or beside 7 others of different lengths."""

from __future__ import annotations

import pytest

from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams

PROMPTS = [
    "def add(a, b):",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
    "漢字",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x)\nfor i in range(10):",
    "a",
    "Café crème, naïve façade",
    "Emoji: 🚀🔥✨",
    "1, 2, 3, 1, 2, 3, 1, 2",
]


@pytest.fixture(scope="module")
def engines(tiny_dirs):
    target = load_model(tiny_dirs["target"])
    return {
        "same": Engine(target, load_model(tiny_dirs["draft_same"]), EngineConfig(method=Method.DRAFT)),
        "other": Engine(target, load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.DRAFT)),
        # Both models through transformers' forward and ragged.forward's padded batches, not models/decoder.py.
        "other-transformers": Engine(
            target, load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.DRAFT, small_m_linear=False)
        ),
    }


def test_both_models_run_the_lean_forward_unless_the_kernel_is_off(engines):
    assert engines["other"]._drafters[Method.DRAFT].decoder is not None
    assert engines["other"]._target_decoder is not None
    assert engines["other-transformers"]._drafters[Method.DRAFT].decoder is None
    assert engines["other-transformers"]._target_decoder is None


def cache_length(cache) -> int:
    """Positions a target cache holds: the lean forward's KVCache or transformers' DynamicCache."""
    return cache.length if hasattr(cache, "length") else cache.get_seq_length()


def requests(engine, sampling=None, spec=None):
    return [
        GenerationRequest(
            prompt_ids=engine.encode(p),
            max_new_tokens=10 + 3 * i,
            ignore_eos=True,
            sampling=sampling or SamplingParams(),
            speculation=spec(i) if spec else SpeculationParams(),
        )
        for i, p in enumerate(PROMPTS)
    ]


def alone(engine, req):
    return [t for out in engine.generate(req) for t in out.token_ids]


def together(engine, reqs, stagger=True):
    """All requests in one batch; with stagger, they join one per step (joins between steps)."""
    seqs, waiting = [], [engine.start(r) for r in reqs]
    while waiting or seqs:
        if waiting:
            seqs.extend(waiting[:1] if stagger else waiting)
            waiting = waiting[1:] if stagger else []
        engine.step_batch(seqs)
        done = [s for s in seqs if s.finished]
        seqs = [s for s in seqs if not s.finished]
        yield from done


SPECS = {
    "fixed4": lambda i: SpeculationParams(gamma=4),
    "mixed": lambda i: [SpeculationParams(gamma=i % 5), SpeculationParams(gamma_max=6), SpeculationParams(method=Method.NONE), SpeculationParams(method=Method.NGRAM, gamma=3)][i % 4],
}


@pytest.mark.parametrize("drafter", ["same", "other", "other-transformers"])
@pytest.mark.parametrize("spec", list(SPECS))
@pytest.mark.parametrize("stagger", [False, True])
def test_greedy_alone_equals_batched(engines, drafter, spec, stagger):
    engine = engines[drafter]
    reqs = requests(engine, spec=SPECS[spec])
    ref = {id(r): alone(engine, r) for r in reqs}
    baseline = {id(r): alone(engine, GenerationRequest(r.prompt_ids, r.max_new_tokens, ignore_eos=True, speculation=SpeculationParams(method=Method.NONE))) for r in reqs}
    finished = list(together(engine, reqs, stagger))
    assert len(finished) == len(reqs)
    for s in finished:
        assert s.output_ids == ref[id(s.request)] == baseline[id(s.request)]
    assert max(engine.costs.target) > 9  # some verify forwards really held several rows


def test_sampled_output_depends_only_on_seed(engines):
    engine = engines["other"]
    reqs = requests(engine, sampling=SamplingParams(temperature=0.8, seed=11), spec=SPECS["fixed4"])
    ref = {id(r): alone(engine, r) for r in reqs}
    for s in together(engine, reqs):
        assert s.output_ids == ref[id(s.request)]


def test_greedy_beside_sampled_with_a_longer_gamma(engines):
    """A greedy row drafts its first position beside a sampled row (which needs q), its later ones alone: the
    drafter must not mix q tensors and None for it (found by the reliability fuzz: TypeError in torch.stack)."""
    engine = engines["other"]
    greedy = GenerationRequest(engine.encode(PROMPTS[0]), 12, ignore_eos=True, speculation=SpeculationParams(gamma=3))
    sampled = GenerationRequest(engine.encode(PROMPTS[1]), 12, ignore_eos=True, speculation=SpeculationParams(gamma=1),
                                sampling=SamplingParams(temperature=0.8, seed=5))  # fmt: skip
    ref = {id(r): alone(engine, r) for r in (greedy, sampled)}
    finished = list(together(engine, [greedy, sampled], stagger=False))
    assert len(finished) == 2
    for s in finished:
        assert s.output_ids == ref[id(s.request)]


def test_extreme_but_valid_filters_do_not_fail_the_batch(engines):
    """top_p 1e-300 and min_p just below 1 are valid; rounded to float32 they became 0 and 1, the kernel refused
    them and the whole batch failed (found by the reliability fuzz)."""
    engine = engines["other"]
    extreme = [SamplingParams(temperature=0.7, top_p=1e-300, seed=1), SamplingParams(temperature=0.7, min_p=1 - 1e-11, seed=2),
               SamplingParams(temperature=1e-300, seed=3)]  # fmt: skip
    reqs = [GenerationRequest(engine.encode(PROMPTS[i]), 6, ignore_eos=True, sampling=s, speculation=SpeculationParams(gamma=2))
            for i, s in enumerate(extreme)]  # fmt: skip
    greedy = GenerationRequest(engine.encode(PROMPTS[3]), 6, ignore_eos=True)
    finished = list(together(engine, [*reqs, greedy], stagger=False))
    assert len(finished) == 4 and all(len(s.output_ids) == 6 for s in finished)
    # top_p → 0 and min_p → 1 keep only the most likely token: the output is the greedy one
    for s in finished[:2]:
        plain = GenerationRequest(s.request.prompt_ids, 6, ignore_eos=True, speculation=SpeculationParams(method=Method.NONE))
        assert s.output_ids == alone(engine, plain)


@pytest.mark.parametrize("rows", [1, 3])  # one row's caches grow in place; batched rows get new ones
@pytest.mark.parametrize("where", ["_verify", "_emit"])
def test_recover_after_a_failed_step_keeps_the_output_exact(engines, monkeypatch, where, rows):
    """A step that raises after its forwards grew the caches: recover() drops that, and the next steps give
    exactly the output of an undisturbed run (greedy, batched)."""
    engine = engines["other"]
    reqs = requests(engine, spec=lambda i: SpeculationParams(gamma=3))[:rows]
    expected = [alone(engine, r) for r in reqs]
    seqs = [engine.start(r) for r in reqs]
    engine.step_batch(seqs)
    engine.step_batch(seqs)
    original = getattr(engine, where)

    def broken(*args, **kwargs):
        raise RuntimeError("injected")

    monkeypatch.setattr(engine, where, broken)
    lengths = [len(s.all_ids) for s in seqs]
    with pytest.raises(RuntimeError, match="injected"):
        engine.step_batch(seqs)
    monkeypatch.setattr(engine, where, original)
    assert [len(s.all_ids) for s in seqs] == lengths  # nothing emitted by the failed step
    # Between healthy steps both counts are len(all_ids) - 1; the failure must have broken that to mean anything.
    valid = [len(s.all_ids) - 1 for s in seqs]
    dirty = [cache_length(s.target_cache) != v or s.target_len != v or s.draft_state.length > v for s, v in zip(seqs, valid)]
    assert all(dirty)
    for s in seqs:
        engine.recover(s)
    while not all(s.finished for s in seqs):
        engine.step_batch([s for s in seqs if not s.finished])
    assert [list(s.output_ids) for s in seqs] == expected


def test_a_seeded_sample_with_adaptive_gamma_does_not_depend_on_step_costs(engines, monkeypatch):
    """Measured step costs vary from run to run; a seeded sampled request must not see them (its γ comes from its
    own α alone), while a greedy request's γ follows them: the control that the costs given here matter."""
    engine = engines["other"]
    seeded = requests(engine, sampling=SamplingParams(temperature=0.8, seed=5))[3]
    greedy = requests(engine)[3]

    def run(draft_seconds: float):
        monkeypatch.setattr(engine.costs, "draft_cost", lambda tokens: draft_seconds)
        monkeypatch.setattr(engine.costs, "target_cost", lambda tokens, rows=None: 1.0)
        out = {}
        for name, req in (("seeded", seeded), ("greedy", greedy)):
            seq = next(together(engine, [req]))
            out[name] = (seq.output_ids, seq.metrics.proposed)
        return out

    cheap, dear = run(0.001), run(5.0)  # a draft forward at 0.1% and at 5x a target forward
    assert dear["seeded"] == cheap["seeded"] and cheap["seeded"][1] > 0
    assert dear["greedy"][0] == cheap["greedy"][0]  # greedy output never varies
    assert dear["greedy"][1] < cheap["greedy"][1] / 2
