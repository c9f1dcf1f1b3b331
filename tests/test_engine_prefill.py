"""Chunked prefill: a long prompt is prefilled a chunk per step while the running requests keep stepping."""

from __future__ import annotations

import math

import pytest

from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SpeculationParams

CHUNK = 8


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    return load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"])


def greedy(engine: Engine, prompt_ids: list[int], n: int, method: Method = Method.DRAFT) -> GenerationRequest:
    return GenerationRequest(prompt_ids, n, ignore_eos=True, speculation=SpeculationParams(method=method))


def test_a_long_prompt_prefills_a_chunk_per_step_while_a_running_request_keeps_emitting(pair):
    chunked = Engine(*pair, EngineConfig(prefill_chunk=CHUNK))
    whole = Engine(*pair, EngineConfig(prefill_chunk=0))
    long_ids = chunked.encode(" ".join(str(i) for i in range(40)))
    assert len(long_ids) > 3 * CHUNK
    running = chunked.start(greedy(chunked, chunked.encode("def add(a, b):"), 40))
    while not running.output_ids:
        chunked.step_batch([running])
    joining = chunked.start(greedy(chunked, long_ids, 12))

    silent_steps = 0
    while not joining.output_ids:
        before = joining.target_len
        out_running, out_joining = chunked.step_batch([running, joining])
        assert out_running.token_ids, "the running request must not wait for the whole prompt"
        if not out_joining.token_ids:
            silent_steps += 1
            assert joining.target_len - before == CHUNK and not out_joining.finished
    assert silent_steps == math.ceil((len(long_ids) - CHUNK) / CHUNK)

    seqs = [running, joining]
    while not all(s.finished for s in seqs):
        chunked.step_batch([s for s in seqs if not s.finished])
    for s in seqs:  # the same greedy tokens as a one-forward prefill, and as target-only decoding
        ref = [t for out in whole.generate(greedy(whole, s.request.prompt_ids, s.request.max_new_tokens)) for t in out.token_ids]
        base = [t for out in whole.generate(greedy(whole, s.request.prompt_ids, s.request.max_new_tokens, Method.NONE))
                for t in out.token_ids]  # fmt: skip
        assert s.output_ids == ref == base


def test_prompts_longer_than_a_chunk_are_chunked_one_at_a_time_first_come_first_served(pair):
    engine = Engine(*pair, EngineConfig(prefill_chunk=CHUNK))
    whole = Engine(*pair, EngineConfig(prefill_chunk=0))
    first = engine.encode(" ".join(str(i) for i in range(6)))
    second = engine.encode(" ".join(str(i) for i in range(30, 45)))
    assert CHUNK < len(first) < 2 * CHUNK < len(second)
    seqs = [engine.start(greedy(engine, ids, 6)) for ids in (first, second)]
    seqs.append(engine.start(greedy(engine, engine.encode("a"), 6)))  # short: prefills at once
    steps = []
    while not all(s.finished for s in seqs):
        engine.step_batch([s for s in seqs if not s.finished])
        steps.append((seqs[0].target_len, bool(seqs[0].output_ids), seqs[1].target_len))
    assert steps[0] == (CHUNK, False, 0) and seqs[2].output_ids  # one chunk of the first; the short one emitted
    assert steps[1][1] and steps[1][2] == CHUNK  # the first's remainder in its own forward, the second's first chunk
    for s in seqs:
        ref = [t for out in whole.generate(greedy(whole, s.request.prompt_ids, 6)) for t in out.token_ids]
        assert s.output_ids == ref


def test_generate_yields_no_empty_steps_and_a_short_prompt_is_not_chunked(pair):
    engine = Engine(*pair, EngineConfig(prefill_chunk=CHUNK))
    long_ids = engine.encode(" ".join(str(i) for i in range(40)))
    outs = list(engine.generate(greedy(engine, long_ids, 5)))
    assert all(o.token_ids for o in outs) and sum(len(o.token_ids) for o in outs) == 5
    short = engine.start(greedy(engine, long_ids[:CHUNK], 5))
    assert engine.step_batch([short])[0].token_ids  # a prompt of exactly one chunk prefills in its first step


def test_prefill_chunk_must_not_be_negative():
    with pytest.raises(ValueError, match=r"prefill_chunk must be >= 0 \(0: the whole prompt in one forward\), got -1"):
        EngineConfig(prefill_chunk=-1)
