"""Sampled speculative output follows the target's distribution: the joint law of the first three tokens.

The first token comes from the prefill step; tokens two and three come from one speculative step with
γ = 2 (accept, residual and bonus paths). The exact joint distribution is computed from the target model
with transformers' own logits warpers, independently of the kernels, and a chi-square goodness-of-fit
test (cells pooled to expected counts ≥ 5) must not reject at p < 1e-3. A deliberately wrong acceptance
rule (accept every draft) must be rejected by the same test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams
from seeded_counts import output_counts
from tiny import llama, save, word_tokenizer

TOKENS = 3
TRIALS = 4000
P_THRESHOLD = 1e-3


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return Engine(load_model(tiny_dirs["small_target"]), load_model(tiny_dirs["small_draft"]), EngineConfig(method=Method.DRAFT))


def exact_joint(model, prompt: list[int], temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    warp = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopPLogitsWarper(top_p)] if top_p < 1 else []))

    def next_probs(ids):
        with torch.inference_mode():
            logits = model(torch.tensor([ids])).logits[:, -1].double()
        return torch.softmax(warp(torch.tensor([ids]), logits), -1)[0].numpy()

    vocab = model.config.vocab_size
    joint: dict[tuple[int, ...], float] = {}
    p1 = next_probs(prompt)
    for a in range(vocab):
        if p1[a] == 0:
            continue
        p2 = next_probs(prompt + [a])
        for b in range(vocab):
            if p2[b] == 0:
                continue
            p3 = next_probs(prompt + [a, b])
            for c in range(vocab):
                if p3[c] > 0:
                    joint[(a, b, c)] = p1[a] * p2[b] * p3[c]
    return joint


def sample_counts(engine: Engine, prompt, sampling: dict, method: Method) -> dict[tuple[int, ...], int]:
    """TRIALS generations, one seed each."""
    return output_counts(engine, lambda seed: GenerationRequest(
        prompt_ids=prompt, max_new_tokens=TOKENS, ignore_eos=True, sampling=SamplingParams(seed=seed, **sampling),
        speculation=SpeculationParams(method=method, gamma=2)), TRIALS)  # fmt: skip


def gof_pvalue(counts: dict, joint: dict) -> float:
    assert set(counts) <= set(joint), "sampled a sequence the target gives probability 0"
    cells = sorted(joint, key=joint.get, reverse=True)
    obs, exp = [], []
    pooled_o = pooled_e = 0.0
    for cell in cells:
        e = joint[cell] * TRIALS
        if e >= 5:
            obs.append(counts.get(cell, 0))
            exp.append(e)
        else:
            pooled_o += counts.get(cell, 0)
            pooled_e += e
    obs.append(pooled_o)
    exp.append(pooled_e)
    exp_arr = np.asarray(exp) * (sum(obs) / sum(exp))
    return float(chisquare(obs, exp_arr).pvalue)


CONFIGS = [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9}]


@pytest.mark.parametrize("sampling", CONFIGS, ids=["t1.0", "t0.7-p0.9"])
def test_speculative_sampling_follows_target(engine, sampling):
    prompt = [1, 5, 3]
    joint = exact_joint(engine.target.model, prompt, sampling["temperature"], sampling.get("top_p", 1.0))
    spec = sample_counts(engine, prompt, sampling, Method.DRAFT)
    assert gof_pvalue(spec, joint) > P_THRESHOLD
    # The baseline through the same engine follows the same law.
    assert gof_pvalue(sample_counts(engine, prompt, sampling, Method.NONE), joint) > P_THRESHOLD


def test_negative_control_accept_all_is_rejected(engine, monkeypatch):
    """Accepting every draft yields the draft's law for tokens 2-3: the same test must reject it."""
    real_verify = engine.kernels.verify

    def accept_all(target_logits, draft_tokens, draft_probs, num_draft, **kw):
        tokens, num_accepted = real_verify(target_logits, draft_tokens, draft_probs, num_draft, **kw)
        tokens, num_accepted, k = np.asarray(tokens), np.asarray(num_accepted), draft_tokens.shape[1]
        if k:
            last = tokens[np.arange(len(tokens)), num_accepted]  # a valid target-sampled token
            tokens[:, :k] = draft_tokens
            tokens[:, k] = last
            num_accepted[:] = k
        return tokens, num_accepted

    monkeypatch.setattr(engine.kernels, "verify", accept_all)
    prompt = [1, 5, 3]
    joint = exact_joint(engine.target.model, prompt, 1.0, 1.0)
    assert gof_pvalue(sample_counts(engine, prompt, {"temperature": 1.0}, Method.DRAFT), joint) < P_THRESHOLD


def test_same_seed_same_output(engine):
    """With a fixed γ the sample is a function of the seed (so it is with adaptive γ: a seeded sampled request
    picks γ from its own α alone, see test_engine_batch.py::test_a_seeded_sample_with_adaptive_gamma_does_not_depend_on_step_costs)."""
    req = lambda: GenerationRequest(
        prompt_ids=[2, 4],
        max_new_tokens=12,
        ignore_eos=True,
        sampling=SamplingParams(temperature=1.0, seed=7),
        speculation=SpeculationParams(gamma=3),
    )
    a = [t for s in engine.generate(req()) for t in s.token_ids]
    b = [t for s in engine.generate(req()) for t in s.token_ids]
    assert a == b


@pytest.fixture(scope="module")
def quantised_engine(tmp_path_factory):
    """A q4 target and an int8 draft (the quantised kernel's two layouts), the draft scoring only half the
    vocabulary: q is zero outside it, and the residual must make up the target's law."""
    root = tmp_path_factory.mktemp("quantised")
    words = word_tokenizer()
    target = save(llama(len(words), seed=3, hidden=128), words, root / "target")
    draft = save(llama(len(words), seed=4, hidden=128, layers=1), words, root / "draft")
    config = EngineConfig(method=Method.DRAFT, draft_vocab=len(words) // 2)
    return Engine(load_model(target, dtype="q4"), load_model(draft, dtype="int8"), config)


def test_speculative_sampling_follows_a_quantised_target_with_a_reduced_draft_vocabulary(quantised_engine):
    engine = quantised_engine
    assert engine._drafters[Method.DRAFT].decoder.vocab.numel() < engine.vocab_size
    prompt = [1, 5, 3]
    joint = exact_joint(engine.target.model, prompt, 1.0, 1.0)
    assert gof_pvalue(sample_counts(engine, prompt, {"temperature": 1.0}, Method.DRAFT), joint) > P_THRESHOLD
