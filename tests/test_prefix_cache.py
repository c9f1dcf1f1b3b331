"""Prefix caching (engine/prefix_cache.py): a reused prefix gives the bits a cold prefill gives, hits are whole
prefixes, the budget holds, and the engine's outputs do not change with the cache on."""

from __future__ import annotations

import pytest
import torch

from specdec.engine import Engine, EngineConfig
from specdec.engine.prefix_cache import BLOCK, PrefixCache
from specdec.models import decoder as lean, quant, ragged
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams
from tiny import llama

VOCAB = 320


def prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))]


def prefill(dec: lean.Decoder, ids: list[int], cache: lean.KVCache | None = None, start: int = 0):
    with torch.inference_mode():
        [cache], [logits] = dec.forward([ragged.Row(cache, start, ids[start:], [len(ids) - start - 1])], VOCAB)
    return cache, logits


@pytest.mark.parametrize("precision", ["float", "q4"])
def test_a_reused_prefix_gives_the_cold_prefills_bits_and_a_shifted_one_does_not(precision):
    model = llama(VOCAB, seed=5, hidden=128)
    if precision != "float":
        quant.quantize_model(model, precision)
    dec = lean.Decoder(model)
    shared = prompt(1, 2 * BLOCK + 10)
    first, second = shared + prompt(2, 30), shared + prompt(3, 40)
    cache = PrefixCache(1 << 30)
    kv, _ = prefill(dec, first)
    assert cache.extend("m", first, kv, 0, 0, len(first)) == 2 * BLOCK  # the blocks the forward computed whole
    hit, length = cache.load("m", second, len(second) - 1, count=True)
    assert length == 2 * BLOCK and (cache.queried_tokens, cache.hit_tokens) == (len(second) - 1, 2 * BLOCK)
    _, warm = prefill(dec, second, hit, length)
    _, cold = prefill(dec, second)
    assert torch.equal(warm, cold)
    # The control: the same blocks one position off give other logits, so the equality above has power.
    shifted, _ = cache.load("m", second, len(second) - 1)
    shifted.keys[:, :, 1:length] = shifted.keys[:, :, : length - 1].clone()
    _, off = prefill(dec, second, shifted, length)
    assert not torch.equal(off, cold)


def test_a_hit_is_a_whole_prefix_of_the_same_model():
    dec = lean.Decoder(llama(VOCAB, seed=6, hidden=64))
    ids = prompt(4, 3 * BLOCK + 1)
    cache = PrefixCache(1 << 30)
    kv, _ = prefill(dec, ids)
    cache.extend("target", ids, kv, 0, 0, len(ids))
    assert cache.load("target", ids, len(ids) - 1)[1] == 3 * BLOCK
    assert cache.load("target", ids, 3 * BLOCK - 1)[1] == 2 * BLOCK  # never the block the limit cuts
    assert cache.load("draft", ids, len(ids) - 1) == (None, 0)  # another model's blocks
    changed = [ids[0] + 1] + ids[1:]  # the control: the same later blocks behind another first token
    assert cache.load("target", changed, len(changed) - 1) == (None, 0)
    # A forward that began off a block boundary, or past what was computed canonically, stores nothing.
    fresh = PrefixCache(1 << 30)
    assert fresh.extend("target", ids, kv, 0, 5, len(ids)) == 0 and len(fresh) == 0
    assert fresh.extend("target", ids, kv, 0, BLOCK, len(ids)) == 0 and len(fresh) == 0


def test_the_budget_holds_and_eviction_cuts_prefixes_from_their_ends():
    dec = lean.Decoder(llama(VOCAB, seed=7, hidden=64))
    a, b = prompt(5, 3 * BLOCK), prompt(6, 3 * BLOCK)
    kv_a, _ = prefill(dec, a)
    kv_b, _ = prefill(dec, b)
    probe = PrefixCache(1 << 30)
    probe.extend("m", a, kv_a, 0, 0, BLOCK)
    block_bytes = probe.bytes
    cache = PrefixCache(4 * block_bytes)
    cache.extend("m", a, kv_a, 0, 0, len(a))
    cache.extend("m", b, kv_b, 0, 0, len(b))  # 6 blocks into room for 4: a's last two go first
    assert cache.bytes == 4 * block_bytes and len(cache) == 4
    assert cache.load("m", a, len(a))[1] == BLOCK and cache.load("m", b, len(b))[1] == 3 * BLOCK
    off = PrefixCache(0)
    assert off.extend("m", a, kv_a, 0, 0, len(a)) == 0 and off.bytes == 0


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    return load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"])


def run(engine: Engine, ids: list[int], method: Method, temperature: float = 0.0, scope: str = "") -> tuple[list[int], int]:
    """A request's tokens, and its prompt tokens taken from the prefix cache."""
    seq = engine.start(GenerationRequest(ids, 12, ignore_eos=True,
                                         speculation=SpeculationParams(method=method, cache_scope=scope),
                                         sampling=SamplingParams(temperature=temperature, seed=3)))  # fmt: skip
    out = []
    while not seq.finished:
        out += engine.step_batch([seq])[0].token_ids
    return out, seq.metrics.cached_prompt_tokens


@pytest.mark.parametrize("method", [Method.DRAFT, Method.NONE])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_the_engine_gives_the_same_tokens_with_the_cache_on_and_off(pair, method, temperature):
    """Chunked prefill from a hit, the draft's catch-up from its own hit, and speculation after them: the same
    tokens as an engine without the cache, greedy and seeded sampling, and greedy speculative equals target-only."""
    on = Engine(*pair, EngineConfig(prefill_chunk=2 * BLOCK))
    off = Engine(*pair, EngineConfig(prefill_chunk=2 * BLOCK, prefix_cache_bytes=0))
    system = [int(t) for t in torch.randint(3, 300, (5 * BLOCK + 7,), generator=torch.Generator().manual_seed(8))]
    questions = [system + [int(t) for t in torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n))]
                 for n in (9, 70, 20)]  # fmt: skip
    hits = []
    for ids in questions:
        tokens, cached = run(on, ids, method, temperature)
        assert tokens == run(off, ids, method, temperature)[0]
        if temperature == 0.0:
            assert tokens == run(off, ids, Method.NONE)[0]
        hits.append(cached)
    assert hits[0] == 0 and hits[1] == hits[2] == 5 * BLOCK
    assert on.prefix_cache.hit_tokens == 10 * BLOCK and on.prefix_cache.bytes > 0
    assert off.prefix_cache.bytes == 0 and run(off, questions[0], method)[1] == 0


def test_a_negative_budget_is_refused():
    with pytest.raises(ValueError, match=r"prefix_cache_bytes must be >= 0 \(0: off\), got -1"):
        EngineConfig(prefix_cache_bytes=-1)
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        PrefixCache(-5)


def test_requests_of_another_cache_scope_do_not_share_prefix_blocks(pair):
    """The same prompt in scope "a" twice hits the cache the second time; in scope "b" (the control) it does not,
    and its tokens are still the same."""
    engine = Engine(*pair, EngineConfig(prefill_chunk=2 * BLOCK))
    ids = [int(t) for t in torch.randint(3, 300, (3 * BLOCK + 5,), generator=torch.Generator().manual_seed(9))]

    first, hit_first = run(engine, ids, Method.DRAFT, scope="a")
    again, hit_again = run(engine, ids, Method.DRAFT, scope="a")
    other, hit_other = run(engine, ids, Method.DRAFT, scope="b")
    assert (hit_first, hit_again, hit_other) == (0, 3 * BLOCK, 0)
    assert first == again == other
