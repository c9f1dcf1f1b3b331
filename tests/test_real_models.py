"""Real-model checks on the demo pair (Qwen2.5-Coder 0.5B → 1.5B). Run with `make test-models`.

Skipped unless the models are in the cache (`specdec models fetch`).
"""

from __future__ import annotations

import pytest

from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams

pytestmark = pytest.mark.real_models

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences what a hash map is.",
]


@pytest.fixture(scope="module")
def engine():
    from specdec.engine import Engine
    from specdec.models.fetch import list_models

    paths = {m["role"]: m["path"] for m in list_models() if m["state"] == "ready"}
    if not {"target", "draft"} <= paths.keys():
        pytest.skip("the demo pair is not in the cache; run `specdec models fetch`")
    return Engine.load(paths["target"], paths["draft"])  # the default precisions: both GGUF files as stored


def tokens(engine, prompt: str, **spec) -> tuple[list[int], object]:
    req = GenerationRequest(
        prompt_ids=engine.encode_chat([{"role": "user", "content": prompt}]),
        max_new_tokens=32,
        ignore_eos=True,
        sampling=SamplingParams(),
        speculation=SpeculationParams(**spec),
    )
    seq = engine.start(req)
    while not seq.finished:
        engine.step_batch([seq])
    return seq.output_ids, seq.metrics


@pytest.mark.parametrize("prompt", PROMPTS)
def test_demo_pair_greedy_identical(engine, prompt):
    base, _ = tokens(engine, prompt, method=Method.NONE)
    spec, m = tokens(engine, prompt, method=Method.DRAFT, gamma=4)
    assert spec == base
    assert m.acceptance_rate > 0.3  # a real pair agrees far more often than chance
