"""grouped_sdpa: transformers' SDPA without copying the key/value heads under a mask, and the same logits."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as hf_sdpa
from tiny import llama

from specdec.models import attention, isa, ragged

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


@pytest.mark.parametrize("path", isa.supported())
def test_attend_rows_matches_sdpa_and_each_row_alone(path, monkeypatch):
    """The per-row kernel: each row over its own span of keys (grouped heads) as torch's attention computes it, and
    bit for bit what the same row gets alone, whatever rows are beside it (a verify equals decode steps)."""
    monkeypatch.setattr(isa, "ISA", path)
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, dim, length = 6, 2, 40, 23  # 40: a vector tail on every path
    q = torch.randn(9, heads, dim, generator=g).transpose(0, 1)  # [heads, rows, dim], strided like a model's view
    k, v = torch.randn(kv_heads, length, dim, generator=g), torch.randn(kv_heads, length, dim, generator=g)
    begin = torch.tensor([0, 0, 3, 5, 0, 0, 7, 2, 4])
    end = torch.tensor([1, 23, 9, 5, 12, 13, 8, 20, 23])  # row 3 attends to nothing
    out = attention.attend_rows(q, k, v, begin, end, None, torch.full((heads, 9, dim), float("nan")))
    for r in range(9):
        b, e = int(begin[r]), int(end[r])
        if e > b:
            want = torch.nn.functional.scaled_dot_product_attention(
                q[None, :, r : r + 1], k[None, :, b:e], v[None, :, b:e], enable_gqa=True)[0, :, 0]  # fmt: skip
        else:
            want = torch.zeros(heads, dim)
        torch.testing.assert_close(out[:, r], want, rtol=1e-5, atol=1e-5)
        alone = attention.attend_rows(q[:, r : r + 1], k, v, begin[r : r + 1], end[r : r + 1], None, torch.empty(heads, 1, dim))
        assert torch.equal(alone[:, 0], out[:, r]), r
    # The control: a span one key short is caught by the same comparison.
    short = attention.attend_rows(q[:, 1:2], k, v, begin[1:2], end[1:2] - 1, None, torch.empty(heads, 1, dim))
    assert not torch.allclose(short[:, 0], out[:, 1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        attention.attend_rows(q, k[:1].expand(4, -1, -1), v, begin, end, None, torch.empty(heads, 9, dim))
