"""ragged.forward: new prompts packed into one sequence give each prompt what it gets alone."""

from __future__ import annotations

import pytest
import torch
from tiny import llama

from specdec.models import attention, ragged

VOCAB = 50
LENGTHS = (5, 1, 12, 7)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _prefill_then_decode(model, prompts: list[list[int]], together: bool):
    """Prefill (packed when together, else one forward per prompt), then one decode step per prompt alone."""
    rows = [ragged.Row(None, 0, p, list(range(len(p)))) for p in prompts]
    with torch.inference_mode():
        if together:
            caches, logits = ragged.forward(model, rows, VOCAB)
        else:
            caches, logits = map(list, zip(*(ragged.forward(model, [r], VOCAB) for r in rows)))
            caches, logits = [c[0] for c in caches], [x[0] for x in logits]
        after = [ragged.forward(model, [ragged.Row(c, len(p), [7], [0])], VOCAB)[1][0] for c, p in zip(caches, prompts)]
    return caches, logits, after


@pytest.fixture(scope="module")
def model():
    m = llama(VOCAB, seed=11)
    attention.install(m)
    return m


_pack = ragged._pack


def _wrong_mask(rows):  # control: one causal square, so a prompt sees the prompts packed before it
    ids, positions, mask = _pack(rows)
    return ids, positions, torch.ones_like(mask).tril_()


def _wrong_positions(rows):  # control: positions run on across the pack instead of restarting per prompt
    ids, positions, mask = _pack(rows)
    return ids, torch.arange(ids.shape[1])[None], mask



@pytest.mark.parametrize("broken", [None, _wrong_mask, _wrong_positions], ids=["packed", "control-mask", "control-positions"])
def test_packed_prefill_matches_each_prompt_alone(model, monkeypatch, broken):
    prompts = _prompts()
    alone = _prefill_then_decode(model, prompts, together=False)
    if broken is not None:
        monkeypatch.setattr(ragged, "_pack", broken)
    packed = _prefill_then_decode(model, prompts, together=True)

    def same() -> bool:
        for cache_a, cache_p in zip(alone[0], packed[0]):
            for (ka, va), (kp, vp) in zip(cache_a.to_legacy_cache(), cache_p.to_legacy_cache()):
                if ka.shape != kp.shape or not (torch.allclose(ka, kp, atol=1e-5) and torch.allclose(va, vp, atol=1e-5)):
                    return False
        return all(torch.allclose(a, p, atol=1e-5) for a, p in zip(alone[1] + alone[2], packed[1] + packed[2]))

    assert same() == (broken is None)


def test_a_pack_of_new_prompts_beside_a_cached_row_is_not_packed(model, monkeypatch):
    """A row with a cache takes the padded batch; packing is only for rows that have nothing cached."""
    calls = []
    monkeypatch.setattr(ragged, "_pack", lambda rows: calls.append(len(rows)) or _pack(rows))
    prompts = _prompts()
    with torch.inference_mode():
        caches, _ = ragged.forward(model, [ragged.Row(None, 0, p, [len(p) - 1]) for p in prompts[:2]], VOCAB)
        ragged.forward(model, [ragged.Row(caches[0], len(prompts[0]), [3], [0]), ragged.Row(None, 0, prompts[2], [0])], VOCAB)
    assert calls == [2]
