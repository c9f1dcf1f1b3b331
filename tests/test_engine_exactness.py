"""Greedy speculative output equals target-only greedy output, token for token, for every drafter and γ."""

from __future__ import annotations

import copy

import pytest
import torch

from specdec.models import isa, quant
from specdec.models import ragged
from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SpeculationParams
from tiny import bpe_tokenizer, llama, save

PROMPT_TEXTS = [
    "def add(a, b):",
    "The quick brown fox",
    "import numpy as np",
    "Café crème",
    "漢字",
    "for i in range(10):",
    "Emoji: 🚀",
    "Speculative decoding keeps",
    "x = np.zeros((3, 4))\nprint(x)",
    "a",
    "The lazy dog jumps over the quick brown fox and the fox runs",
    "return a + b",
    "über straße",
    "print(i * i)",
    "math: ∑ ∫ √ π",
    "jalapeño",
    "def f():\n    return 1\n\ndef g():\n    return 2\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps",
    "日本語のテキスト。",
    "np.zeros",
    "Speculative decoding keeps the target distribution exactly. Speculative decoding",
]
REPETITIVE = [
    "a b c d a b c d a b c d a b c d",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n    print(i)\nfor i in range(10):",
    "The quick brown fox. The quick brown fox. The quick brown fox. The quick",
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3",
]
GAMMAS = [1, 2, 4, 8, None]  # None: adaptive


@pytest.fixture(scope="module")
def target(tiny_dirs):
    return load_model(tiny_dirs["target"])


@pytest.fixture(scope="module")
def engines(tiny_dirs, target):
    same = load_model(tiny_dirs["draft_same"])
    other = load_model(tiny_dirs["draft_other"])
    same_int8 = load_model(tiny_dirs["draft_same"], dtype="int8")
    return {
        "same": Engine(target, same, EngineConfig(method=Method.DRAFT)),
        "same_int8": Engine(target, same_int8, EngineConfig(method=Method.DRAFT)),
        "other": Engine(target, other, EngineConfig(method=Method.DRAFT)),
        "ngram": Engine(target, None, EngineConfig(method=Method.NGRAM)),
    }


def run(engine: Engine, prompt_ids: list[int], n: int, **spec) -> tuple[list[int], object]:
    req = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=n, ignore_eos=True, speculation=SpeculationParams(**spec))
    seq = engine.start(req)
    while not seq.finished:
        engine.step_batch([seq])
    return seq.output_ids, seq.metrics


def baseline(engine: Engine, prompt_ids: list[int], n: int) -> list[int]:
    return run(engine, prompt_ids, n, method=Method.NONE)[0]


def test_baseline_matches_transformers_generate(engines, target):
    engine = engines["same"]
    for text in PROMPT_TEXTS[:5]:
        ids = engine.encode(text)
        hf = target.model.generate(
            torch.tensor([ids]), max_new_tokens=24, do_sample=False, min_new_tokens=24, pad_token_id=0
        )[0, len(ids) :].tolist()
        assert baseline(engine, ids, 24) == hf


@pytest.mark.parametrize("drafter", ["same", "same_int8", "other"])
@pytest.mark.parametrize("gamma", GAMMAS)
def test_greedy_draft_model_identical(engines, drafter, gamma):
    engine = engines[drafter]
    spec = {"gamma": gamma} if gamma is not None else {"gamma_max": 8}
    for i, text in enumerate(PROMPT_TEXTS):
        ids = engine.encode(text)
        n = 12 + (i % 4) * 6
        out, m = run(engine, ids, n, method=Method.DRAFT, **spec)
        assert out == baseline(engine, ids, n), f"prompt {i} ({text!r})"
        assert len(out) == n
    # The identical draft is accepted (nearly) always, the unrelated one (nearly) never.
    if drafter == "same" and gamma is not None:
        assert m.acceptance_rate > 0.9
    if drafter == "same_int8" and gamma is not None:  # the same weights in int8 (and bfloat16): still mostly accepted
        assert m.acceptance_rate > 0.6
    if drafter == "other" and gamma is not None:
        assert m.acceptance_rate < 0.5


@pytest.mark.parametrize("gamma", GAMMAS)
def test_greedy_ngram_identical(engines, gamma):
    engine = engines["ngram"]
    spec = {"gamma": gamma} if gamma is not None else {"gamma_max": 8}
    proposed = 0
    for text in REPETITIVE + PROMPT_TEXTS:
        ids = engine.encode(text)
        out, m = run(engine, ids, 20, method=Method.NGRAM, **spec)
        assert out == baseline(engine, ids, 20), text
        proposed += m.proposed
    assert proposed > 0  # the lookup did propose on the repetitive prompts


def test_rollback_equals_fresh_prefill(engines, target):
    """After steps with rejections, both caches score the next token exactly as a fresh prefill does."""
    engine = engines["other"]
    seq = engine.start(GenerationRequest(prompt_ids=engine.encode(PROMPT_TEXTS[10]), max_new_tokens=40, ignore_eos=True, speculation=SpeculationParams(gamma=4)))
    for _ in range(4):
        engine.step_batch([seq])
    assert seq.metrics.proposed > seq.metrics.accepted  # some drafts were rejected and rolled back
    ids = seq.all_ids
    assert seq.target_len == len(ids) - 1

    def next_logits(decoder, cache, cached_len):  # the lean forward's caches (KVCache), as the engine keeps them
        row = ragged.Row(copy.deepcopy(cache), cached_len, ids[cached_len:], [len(ids) - cached_len - 1])
        return decoder.forward([row], engine.vocab_size)[1][0][0]

    with torch.inference_mode():
        fresh_t = target.model(input_ids=torch.tensor([ids])).logits[0, -1]
        assert seq.target_cache.length == seq.target_len
        torch.testing.assert_close(next_logits(engine._target_decoder, seq.target_cache, seq.target_len), fresh_t, rtol=1e-5, atol=1e-5)
        assert seq.draft_state.cache.length == seq.draft_state.length <= len(ids) - 1
        fresh_d = engine.draft.model(input_ids=torch.tensor([ids])).logits[0, -1]
        decoder = engine._drafters[Method.DRAFT].decoder
        torch.testing.assert_close(next_logits(decoder, seq.draft_state.cache, seq.draft_state.length), fresh_d, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_new", [1, 2, 3, 5, 9, 17])
def test_max_new_tokens_never_exceeded(engines, max_new):
    engine = engines["same"]
    out, m = run(engine, engine.encode("def add(a, b):"), max_new, gamma=8)
    assert len(out) == max_new
    assert m.completion_tokens == max_new


def test_the_default_draft_of_a_float_model_on_a_cpu_is_int8(tiny_dirs, tmp_path, caplog):
    draft = save(llama(len(bpe_tokenizer()), seed=2, hidden=128, layers=1), bpe_tokenizer(), tmp_path / "draft")
    with caplog.at_level("INFO", logger="specdec.engine"):
        engine = Engine.load(tiny_dirs["target"], draft, device="cpu")
    assert f"small-M kernels: {isa.ISA} path" in caplog.text  # the log at start names the kernel path
    info = engine.info()
    assert (info["target_dtype"], info["draft_dtype"]) == ("float32", "int8")
    assert engine.draft.dtype == torch.bfloat16  # activations; the linear layers hold int8 codes and scales
    kinds = {type(m).__name__ for m in engine.draft.model.modules() if isinstance(m, (torch.nn.Linear, quant.QuantLinear))}
    assert kinds == {"QuantLinear"}
