"""The suffix drafter (engine/drafters/suffix.py): it drafts what earlier text of the same scope continued the
context with, as far as that text agrees, within a token bound; greedy output still equals target-only output."""

from __future__ import annotations

import pytest

from specdec.engine import Engine, EngineConfig
from specdec.engine.drafters.suffix import SuffixIndex
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SpeculationParams


def test_a_lookup_continues_the_longest_match_as_far_as_earlier_text_agrees():
    index = SuffixIndex()
    index.add([1, 2, 3, 4, 5, 6, 7, 8])
    index.add([9, 9, 3, 4, 5, 6, 70, 80])
    assert index.lookup([0, 3, 4], 8) == [5, 6, 70, 80]  # two agree on 5, 6; the newest breaks the tie after
    assert index.lookup([1, 2, 3, 4], 8) == [5, 6, 7, 8]  # the longer match (1, 2, 3, 4): the older document only
    assert index.lookup([1, 2, 3, 4], 2) == [5, 6]
    assert index.lookup([42], 4) == []  # nothing continued 42
    for tail in ([10, 11, 12], [10, 11, 13], [10, 11, 14]):  # three ways on after (10, 11): none reaches 0.3 × …
        index.add([10, 11, *tail])
    assert index.lookup([5, 10, 11], 5) == [10, 11]  # … past the two tokens all three share


def test_the_context_itself_continues_nothing():
    index = SuffixIndex()
    doc = index.add([1, 2, 3])
    assert index.lookup([1, 2, 3], 4) == []  # its own last n-grams end the document
    index.extend(doc, [1, 2])
    assert index.lookup([1, 2], 4) == [3, 1, 2]  # its own earlier (1, 2) did continue


def test_the_index_is_bounded_and_evicts_the_oldest_documents():
    index = SuffixIndex(max_tokens=100)
    index.add([7, 8] + list(range(100, 140)))
    index.add([7, 9] + list(range(200, 240)))
    assert index.lookup([7], 1) in ([8], [9])
    index.add([5] * 40)  # 124 tokens: the oldest goes, down to 90 or fewer
    assert index.tokens <= 100 and index.lookup([7], 1) == [9]
    assert index.lookup([100, 101], 2) == []  # nothing of the evicted document is left in the index
    with pytest.raises(ValueError, match="max_tokens must be >= 1, got 0"):
        SuffixIndex(0)


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return Engine(load_model(tiny_dirs["target"]), None, EngineConfig(method=Method.SUFFIX))


def request(ids: list[int], n: int, method: Method = Method.SUFFIX, scope: str = "") -> GenerationRequest:
    return GenerationRequest(ids, n, ignore_eos=True, speculation=SpeculationParams(method=method, cache_scope=scope))


def tokens(engine: Engine, req: GenerationRequest) -> tuple[list[int], int]:
    seq = engine.start(req)
    out = []
    while not seq.finished:
        out += engine.step_batch([seq])[0].token_ids
    return out, seq.metrics.accepted


def test_a_repeated_request_is_drafted_from_the_first_and_matches_target_only(engine):
    """The second run of a prompt in the same scope drafts the first's output and has it accepted; in another
    scope (the control) it has nothing to draft from at first. Greedy tokens equal target-only every time."""
    prompt = list(range(3, 40))
    baseline, _ = tokens(engine, request(prompt, 24, Method.NONE))
    first, _ = tokens(engine, request(prompt, 24, scope="a"))
    second, accepted = tokens(engine, request(prompt, 24, scope="a"))
    assert first == second == baseline
    assert accepted >= 16
    drafter = engine._drafters[Method.SUFFIX]
    other = engine.start(request(prompt + baseline[:1], 24, scope="b"))
    same = engine.start(request(prompt + baseline[:1], 24, scope="a"))
    assert drafter.propose([same], [6])[0].tokens == baseline[1:7]
    assert drafter.propose([other], [6])[0].tokens != baseline[1:7]
    for s in (other, same):
        engine.release(s)


@pytest.fixture(scope="module")
def pair_engine(tiny_dirs):
    return Engine(load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"]), EngineConfig(method=Method.AUTO))


def test_the_hybrid_drafts_from_earlier_text_where_it_agrees_and_runs_the_model_elsewhere(pair_engine):
    """A fresh prompt has nothing to continue from, so the draft model drafts (its forwards are timed); the same
    prompt again is drafted from the first answer without the model. Greedy tokens equal target-only both times."""
    engine = pair_engine
    prompt = list(range(100, 140))
    baseline, _ = tokens(engine, request(prompt, 20, Method.NONE))
    hybrid = engine._drafters[Method.AUTO]
    fresh = engine.start(request(prompt + baseline[:1], 20, Method.AUTO, scope="fresh"))
    assert hybrid.runs_model_for(fresh)  # no earlier text in this scope: the model drafts
    engine.release(fresh)
    first, _ = tokens(engine, request(prompt, 20, Method.AUTO, scope="h"))
    again = engine.start(request(prompt + baseline[:1], 20, Method.AUTO, scope="h"))
    assert not hybrid.runs_model_for(again)  # the first answer continues it
    assert hybrid.propose([again], [5])[0].tokens == baseline[1:6]
    engine.release(again)
    second, accepted = tokens(engine, request(prompt, 20, Method.AUTO, scope="h"))
    assert first == second == baseline and accepted >= 12


def test_a_seeded_sampled_request_drafts_from_its_own_text_only(engine):
    """Its tokens must not depend on other requests: the same seeded request gives the same tokens before and
    after another request of its scope fills the index with a different continuation."""
    from specdec.types import SamplingParams

    prompt = list(range(50, 80))

    def sampled() -> list[int]:
        req = request(prompt, 16, scope="r")
        req.sampling = SamplingParams(temperature=0.9, seed=11)
        return tokens(engine, req)[0]

    alone = sampled()
    tokens(engine, request(prompt + [7, 8, 9], 16, scope="r"))  # other text after the same prompt
    assert sampled() == alone


def test_prompt_lookup_drafts_from_the_requests_own_text_only(engine):
    """METHOD_NGRAM: the request's own earlier text continues its context; another request's text (the control,
    which suffix drafting would use) does not."""
    ngram = engine._drafters[Method.NGRAM]
    own = engine.start(request([5, 6, 7, 8, 9, 1, 2, 5, 6], 4, Method.NGRAM))
    assert ngram.propose([own], [3])[0].tokens == [7, 8, 9]
    engine.release(own)
    tokens(engine, request(list(range(200, 230)), 8, Method.NGRAM))
    later = engine.start(request([1, 200, 201, 202], 4, Method.NGRAM))
    assert ngram.propose([later], [3])[0].tokens == []
    engine.release(later)


def test_the_hybrid_adds_a_request_to_the_index_once(pair_engine):
    """The γ policy's question and the proposal share one lookup, and the request's text enters its scope's index
    once: the index holds its tokens once after several steps."""
    engine = pair_engine
    prompt = list(range(150, 190))
    tokens(engine, request(prompt, 12, Method.AUTO, scope="once"))
    index = engine._drafters[Method.SUFFIX].indexes[SpeculationParams(cache_scope="once").scope]
    assert index.tokens == len(prompt) + 12
