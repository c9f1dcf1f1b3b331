"""grouped_sdpa: transformers' SDPA without copying the key/value heads under a mask, and the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from tiny import llama

from specdec.models import attention, ragged

VOCAB = 50


def ragged_logits(model) -> list[torch.Tensor]:
    """A masked batch (two prompts of different lengths), then a verify-like step beside a decode step."""
    g = torch.Generator().manual_seed(0)
    rows = [ragged.Row(None, 0, torch.randint(0, VOCAB, (n,), generator=g).tolist(), [n - 1]) for n in (5, 9)]
    with torch.inference_mode():
        caches, first = ragged.forward(model, rows, VOCAB)
        step = [ragged.Row(caches[0], 5, [1, 2, 3], [0, 1, 2]), ragged.Row(caches[1], 9, [4], [0])]
        _, second = ragged.forward(model, step, VOCAB)
    return first + second


def test_grouped_sdpa_gives_transformers_logits():
    reference, grouped = llama(VOCAB, seed=5), llama(VOCAB, seed=5)
    assert attention.install(grouped) and grouped.config._attn_implementation == attention.NAME
    for got, want in zip(ragged_logits(grouped), ragged_logits(reference)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("installed", [True, False])
def test_a_masked_forward_copies_no_key_value_heads(monkeypatch, installed):
    """The control (transformers' own sdpa) repeats the heads under the same masks."""
    model = llama(VOCAB, seed=5)
    if installed:
        attention.install(model)
    calls = []
    monkeypatch.setattr(hf_sdpa, "repeat_kv", lambda x, n: calls.append(n) or x.repeat_interleave(n, dim=1))
    ragged_logits(model)
    assert (len(calls) == 0) == installed


def test_a_model_on_another_attention_is_left_alone():
    model = llama(VOCAB, seed=5)
    model.set_attn_implementation("eager")
    assert not attention.install(model)
    assert model.config._attn_implementation == "eager"
