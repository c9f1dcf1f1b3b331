"""Constrained output (response_format): valid under every drafter, exact under speculation, and bad formats refused.

The tiny random models write nonsense, which is the point: only the grammar's masks make their output valid JSON,
so every check here fails if a mask is missing at any position of a verify step.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from seeded_counts import output_counts

from specdec.engine import Engine, EngineConfig, grammar
from specdec.engine.grammar import Constraint
from specdec.kernels import sampling
from specdec.models.loading import load_model
from specdec.types import FinishReason, GenerationRequest, Method, ResponseFormat, SamplingParams, SpeculationParams

S = {"type": "string", "maxLength": 6}
I = {"type": "integer", "minimum": 0, "maximum": 999}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": I}, "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"color": {"enum": ["red", "green"]}, "n": I}, "required": ["color", "n"],
     "additionalProperties": False},
    {"type": "array", "items": I, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 4},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {"id": I, "tag": S},
     "required": ["id", "tag"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "string", "pattern": "^[a-z]{2,5}$"},
    {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"],
     "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 20},
    {"type": "string", "format": "date"},
    {"type": "boolean"},
    {"type": "null"},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["none"]}]},
    {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object", "properties": {"k": S},
     "required": ["k"], "additionalProperties": False}, "maxItems": 2}}, "required": ["items"],
     "additionalProperties": False},
    {"type": "object", "properties": {"a": {"const": "x"}, "b": {"enum": [1, 2, 3]}}, "required": ["a", "b"],
     "additionalProperties": False},
    {"type": "array", "prefixItems": [I, S, {"type": "boolean"}], "items": False, "minItems": 3},
    {"type": "object", "properties": {"when": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]$"}},
     "required": ["when"], "additionalProperties": False},
    {"$defs": {"pt": {"type": "object", "properties": {"x": I, "y": I}, "required": ["x", "y"],
     "additionalProperties": False}}, "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"},
     "to": {"$ref": "#/$defs/pt"}}, "required": ["from", "to"], "additionalProperties": False},
    {"type": "object", "properties": {"tool": {"enum": ["search", "open"]}, "args": {"type": "object",
     "properties": {"q": S}, "required": ["q"], "additionalProperties": False}}, "required": ["tool", "args"],
     "additionalProperties": False},
    {"type": "string", "enum": ["positive", "negative", "neutral"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": -5,
     "maximum": 5}, "maxItems": 3}}, "required": ["scores"], "additionalProperties": False},
]  # fmt: skip
MAX_NEW = 160


@pytest.fixture(scope="module")
def engine(tiny_dirs):
    return Engine(load_model(tiny_dirs["target"]), load_model(tiny_dirs["draft_other"]),
                  EngineConfig(method=Method.DRAFT, prefix_cache_bytes=0))  # fmt: skip


def fmt(kind: str, spec) -> ResponseFormat:
    return ResponseFormat(kind, spec if isinstance(spec, str) else json.dumps(spec))


def run(engine: Engine, f: ResponseFormat | None, method: Method, *, prompt: str = "def add(a, b):", max_new: int = MAX_NEW,
        sampling: SamplingParams | None = None, top_logprobs: int = 0, logprobs: bool = False, prefix: list[int] = (),
        gamma: int | None = None):  # fmt: skip
    req = GenerationRequest(prompt_ids=engine.encode(prompt) + list(prefix), max_new_tokens=max_new, response_format=f,
                            sampling=sampling or SamplingParams(), speculation=SpeculationParams(method=method, gamma=gamma),
                            logprobs=logprobs, top_logprobs=top_logprobs)  # fmt: skip
    outs = list(engine.generate(req))
    ids = [t for o in outs for t in o.token_ids]
    lps = [x for o in outs for x in o.logprobs] if logprobs or top_logprobs else None
    tops = [t for o in outs for t in o.top_logprobs] if top_logprobs else None
    return ids, "".join(o.text for o in outs), outs[-1].finish_reason, lps, tops


@pytest.mark.parametrize("i", range(len(SCHEMAS)))
def test_every_schema_output_validates_and_speculation_changes_nothing(engine, i):
    schema = SCHEMAS[i]
    base = run(engine, fmt("json_schema", schema), Method.NONE)
    assert base[2] == FinishReason.EOS, f"no end within {MAX_NEW} tokens: {base[1]!r}"
    jsonschema.validate(json.loads(base[1]), schema)
    for method in (Method.DRAFT, Method.NGRAM, Method.AUTO):
        assert run(engine, fmt("json_schema", schema), method)[:3] == base[:3], method
    sampled = run(engine, fmt("json_schema", schema), Method.DRAFT, sampling=SamplingParams(temperature=0.9, seed=i))
    assert sampled[2] == FinishReason.EOS
    jsonschema.validate(json.loads(sampled[1]), schema)


def test_control_the_same_requests_without_a_format_are_not_json(engine):
    """The check above is not vacuous: free output of the tiny model is not even JSON."""
    _, text, *_ = run(engine, None, Method.NONE, max_new=40)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


@pytest.mark.parametrize("kind,spec,check", [
    ("json_object", "", lambda t: isinstance(json.loads(t), dict)),
    ("regex", r"[a-z]{3}-[0-9]{2,3}", lambda t: __import__("re").fullmatch(r"[a-z]{3}-[0-9]{2,3}", t)),
    ("grammar", 'start: "say " WORD "!"\nWORD: /[a-z]{1,5}/', lambda t: __import__("re").fullmatch(r"say [a-z]{1,5}!", t)),
])  # fmt: skip
def test_other_formats(engine, kind, spec, check):
    f = ResponseFormat(kind, spec)
    base = run(engine, f, Method.NONE, max_new=200)
    if base[2] == FinishReason.LENGTH:  # an object with free keys may run on: then its tokens are a valid prefix
        c = engine.grammars.compile(f).constraint()
        assert kind == "json_object" and all(c.push(t) for t in base[0])
    else:
        assert base[2] == FinishReason.EOS and check(base[1]), base[1]
    assert run(engine, f, Method.DRAFT, max_new=200)[:3] == base[:3]


def test_length_ends_on_a_valid_prefix(engine):
    """A request cut by max_new_tokens ends with length; a fresh matcher consumes its tokens (a valid prefix)."""
    f = fmt("json_schema", SCHEMAS[6])
    ids, _, reason, *_ = run(engine, f, Method.DRAFT, max_new=7)
    assert reason == FinishReason.LENGTH and len(ids) == 7
    c = engine.grammars.compile(f).constraint()
    assert all(c.push(t) for t in ids)
    bogus = engine.encode("}")[0]  # control: a token the schema does not allow first
    assert not engine.grammars.compile(f).constraint().push(bogus)


def test_jump_forward_is_exact_and_counted(tiny_dirs):
    """Tokens the grammar allows alone are verified without drafting: same tokens as target-only, fewer steps."""
    eng = Engine(load_model(tiny_dirs["target"]), None, EngineConfig(method=Method.NGRAM, prefix_cache_bytes=0))
    f = fmt("json_schema", SCHEMAS[18])  # long forced keys: "from", "to", "x", "y"
    base = run(eng, f, Method.NONE)
    req = GenerationRequest(prompt_ids=eng.encode("def add(a, b):"), max_new_tokens=MAX_NEW, response_format=f,
                            speculation=SpeculationParams(method=Method.NGRAM))  # fmt: skip
    seq = eng.start(req)
    while not seq.finished:
        eng.step_batch([seq])
    assert seq.output_ids == base[0]
    assert seq.metrics.forced > 5 and seq.metrics.verify_steps < len(seq.output_ids) - 5
    off = Engine(load_model(tiny_dirs["target"]), None,
                 EngineConfig(method=Method.NGRAM, prefix_cache_bytes=0, jump_forward=False))  # fmt: skip
    seq = off.start(req)
    while not seq.finished:
        off.step_batch([seq])
    assert seq.output_ids == base[0] and seq.metrics.forced == 0


@pytest.mark.parametrize("bad,message", [
    (ResponseFormat("regex", "a(b"), "response_format.regex does not compile: "),
    (ResponseFormat("json_schema", "{nope"), "response_format.json_schema does not compile: "),
    (ResponseFormat("json_schema", '{"type": "wizard"}'), "response_format.json_schema does not compile: "),
    (ResponseFormat("grammar", "start: missing_rule"), "response_format.grammar does not compile: "),
    (ResponseFormat("regex", "x" * 70000), "response_format.regex must be at most 65536 bytes, got 70000"),
    (ResponseFormat("grammar", ""), "response_format.grammar must not be empty"),
])  # fmt: skip
def test_bad_formats_are_value_errors_naming_the_field(engine, bad, message):
    req = GenerationRequest(prompt_ids=[1, 2], response_format=bad)
    with pytest.raises(ValueError) as e:
        engine.start(req)
    assert message in str(e.value)


def test_compile_time_and_step_limits_are_enforced(engine, monkeypatch):
    """A format over the compile-time budget is a ValueError naming it; one whose masks need more lexer work than a
    step may spend ends its request with a GrammarError instead of stalling the engine."""
    slow = ResponseFormat("regex", "(a{1000}){1000}")  # its first mask takes the lexer's whole initial fuel
    monkeypatch.setattr(grammar, "COMPILE_SECONDS", 0.0)
    with pytest.raises(ValueError, match=r"response_format.regex took .* s to compile, over the limit of 0.0 s"):
        engine.start(GenerationRequest(prompt_ids=[1], response_format=slow))
    monkeypatch.undo()
    engine.start(GenerationRequest(prompt_ids=[1], response_format=slow))  # control: within the real budget
    monkeypatch.setitem(grammar.LIMITS, "step_lexer_fuel", 1)
    monkeypatch.setitem(grammar.LIMITS, "initial_lexer_fuel", 1)
    with pytest.raises((ValueError, grammar.GrammarError)):
        seq = engine.start(GenerationRequest(prompt_ids=[1], response_format=ResponseFormat("regex", "[a-z]{3}x[0-9]")))
        while not seq.finished:
            engine.step_batch([seq])


# ---- the sampled law under a grammar ----------------------------------------------------------------------------

REGEX = "[a-e]{2,4}"  # ten allowed first tokens on the tiny tokenizer; EOS only after two letters
TRIALS, TOKENS, P_THRESHOLD = 4000, 3, 1e-3


def exact_joint(engine: Engine, prompt: list[int]) -> dict[tuple[int, ...], float]:
    """The law of the first TOKENS tokens under the masked target at temperature 1 (float64, the model's own
    forward; the masks from a fresh matcher), sequences ending at EOS kept short."""
    model, eos = engine.target.model, engine.eos_token_ids
    compiled = engine.grammars.compile(ResponseFormat("regex", REGEX))

    def walk(ids: list[int], c: Constraint, p: float, out: dict) -> None:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ids])).logits[0, -1].double()
        mask = torch.from_numpy(c.allowed()[: logits.shape[0]].copy())
        probs = torch.softmax(logits.masked_fill(~mask, -torch.inf), -1)
        for t in torch.nonzero(probs > 0).flatten().tolist():
            seq = ids + [t]
            if t in eos or len(seq) == TOKENS:
                out[tuple(seq)] = out.get(tuple(seq), 0.0) + p * float(probs[t])
            else:
                nxt = compiled.constraint()
                assert all(nxt.push(x) for x in seq)
                walk(seq, nxt, p * float(probs[t]), out)

    joint: dict = {}
    walk([], compiled.constraint(), 1.0, joint)
    return joint


def sample_counts(engine: Engine, prompt: list[int]) -> dict[tuple[int, ...], int]:
    return output_counts(engine, lambda seed: GenerationRequest(
        prompt_ids=prompt, max_new_tokens=TOKENS, sampling=SamplingParams(temperature=1.0, seed=seed),
        speculation=SpeculationParams(method=Method.DRAFT, gamma=2), response_format=ResponseFormat("regex", REGEX)),
        TRIALS)  # fmt: skip


def pvalue(counts: dict, joint: dict) -> float:
    """χ² goodness of fit with cells of expected count < 5 pooled; 0 when a sequence the law forbids was sampled."""
    if not set(counts) <= set(joint):
        return 0.0
    big = [c for c in joint if joint[c] * TRIALS >= 5]
    obs = [counts.get(c, 0) for c in big] + [sum(counts.get(c, 0) for c in joint if c not in big)]
    exp = np.array([joint[c] for c in big] + [sum(joint[c] for c in joint if c not in big)]) * TRIALS
    return float(chisquare(obs, exp * sum(obs) / exp.sum()).pvalue)


@pytest.fixture(scope="module")
def law(engine):
    prompt = engine.encode("x =")
    return prompt, exact_joint(engine, prompt)


def test_sampled_tokens_follow_the_masked_target(engine, law):
    prompt, joint = law
    assert len(joint) > 30  # the test has cells to tell laws apart
    assert pvalue(sample_counts(engine, prompt), joint) > P_THRESHOLD


def test_control_a_verify_that_ignores_the_mask_is_rejected(engine, law, monkeypatch):
    """The target's logits unmasked in verify (the draft still masked, the matcher told to skip what it cannot
    consume): the same test must reject what comes out."""
    prompt, joint = law
    real_verify = Engine._verify

    def unmasked_verify(self, seqs, proposals, logits):
        saved = [s.constraint for s in seqs]
        for s in seqs:
            s.constraint = None
        try:
            return real_verify(self, seqs, proposals, logits)
        finally:
            for s, c in zip(seqs, saved):
                s.constraint = c

    def lenient_commit(self, tokens):
        self.unwind()
        for t in tokens:
            if self._m.is_stopped() or not self.allowed()[t]:
                break
            self._m.consume_token(t)
            self._masks.clear()

    monkeypatch.setattr(Engine, "_verify", unmasked_verify)
    monkeypatch.setattr(Constraint, "commit", lenient_commit)
    assert pvalue(sample_counts(engine, prompt), joint) < P_THRESHOLD


# ---- logprobs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(top_k=3)], ids=["greedy", "greedy-k3"])
@pytest.mark.parametrize("f", [None, fmt("json_schema", SCHEMAS[0])], ids=["free", "schema"])
def test_logprobs_equal_target_only_to_the_last_bit(engine, sampling, f):
    base = run(engine, f, Method.NONE, max_new=40, sampling=sampling, top_logprobs=5)
    for method in (Method.DRAFT, Method.NGRAM):
        spec = run(engine, f, method, max_new=40, sampling=sampling, top_logprobs=5)
        assert spec[0] == base[0]
        assert np.array_equal(np.array(spec[3], dtype=np.float32), np.array(base[3], dtype=np.float32))
        assert spec[4] == base[4]
    ids, _, _, lps, tops = base
    assert len(lps) == len(tops) == len(ids)
    for tok, lp, top in zip(ids, lps, tops):
        assert top.logprobs == sorted(top.logprobs, reverse=True) and len(top.token_ids) <= 5
        assert lp <= top.logprobs[0] + 1e-6 and np.isfinite(lp)  # the emitted token was possible
        if sampling.greedy:
            assert top.token_ids[0] == tok


def test_sampled_logprobs_equal_target_only_at_each_prefix(engine):
    """Sampled outputs differ between the two (only their law is the same), so each speculative token's values are
    compared with target-only decoding of one token after the same prefix: its 20 most likely tokens."""
    prompt = "def add(a, b):"
    sampling = SamplingParams(temperature=0.8, top_k=40, seed=7)
    ids, _, _, lps, tops = run(engine, None, Method.DRAFT, prompt=prompt, max_new=24, sampling=sampling, top_logprobs=4)
    found = 0
    for j, tok in enumerate(ids):
        ref = run(engine, None, Method.NONE, prompt=prompt, max_new=1, sampling=sampling, top_logprobs=20,
                  prefix=ids[:j])[4][0]  # fmt: skip
        assert tops[j].token_ids == ref.token_ids[:4] and tops[j].logprobs == ref.logprobs[:4], j
        if tok in ref.token_ids:
            assert lps[j] == ref.logprobs[ref.token_ids.index(tok)], j
            found += 1
    assert found >= len(ids) // 2


def test_logprobs_are_the_masked_processed_distribution(engine):
    """One position by hand: log_softmax(masked logits / T) of the model's own forward."""
    f = fmt("json_schema", SCHEMAS[0])
    prompt = engine.encode("def add(a, b):")
    ids, _, _, lps, tops = run(engine, f, Method.DRAFT, max_new=12, sampling=SamplingParams(temperature=0.8, seed=1),
                               top_logprobs=3)  # fmt: skip
    c = engine.grammars.compile(f).constraint()
    for j in range(len(ids)):
        with torch.inference_mode():
            logits = engine.target.model(torch.tensor([prompt + ids[:j]])).logits[0, -1].double()
        mask = torch.from_numpy(c.allowed()[: logits.shape[0]].copy())
        ref = torch.log_softmax(logits.masked_fill(~mask, -torch.inf) / 0.8, -1)
        assert lps[j] == pytest.approx(float(ref[ids[j]]), abs=2e-3)
        assert tops[j].token_ids == ref.topk(len(tops[j].token_ids)).indices.tolist()
        assert c.push(ids[j])


def test_control_logprobs_from_the_wrong_position_are_caught(engine, monkeypatch):
    """An off-by-one in the verify positions (each token reported from its neighbour's distribution) changes nothing
    for target-only decoding, one position a step, and must break the equality above under speculation."""
    real = sampling.logprobs

    def shifted(logits, tokens, **kw):
        return real(logits.roll(1, 0), tokens, **kw)

    base = run(engine, None, Method.NONE, max_new=40, logprobs=True)
    monkeypatch.setattr("specdec.engine.core.sampling.logprobs", shifted)
    assert run(engine, None, Method.NONE, max_new=40, logprobs=True)[3] == base[3]
    # Prompt lookup at a fixed γ: the tiny model repeats itself, so verifies accept drafts (the random draft model's
    # are all rejected, which leaves one row a step), and γ does not depend on other tests' history.
    spec = run(engine, None, Method.NGRAM, max_new=40, logprobs=True, gamma=3)
    assert spec[0] == base[0] and spec[3] != base[3]


def test_apply_masks_in_place():
    logits = torch.zeros(2, 6)
    grammar.apply(logits[1], torch.tensor([True, False, True, False]))
    assert logits[0].tolist() == [0.0] * 6
    m = torch.tensor(grammar.MASK_LOGIT).item()
    assert logits[1].tolist() == [0.0, m, 0.0, m, m, m]


def test_jump_forward_leaves_the_prompt_forward_alone(engine):
    """Forced tokens right after a prompt would complete a 64-position block in the prefill forward, which takes the
    GEMM instead of the decode kernel: the logits after them would differ in their last bits from target-only
    decoding. Jump-forward waits for the first decode step (the values below differ without that)."""
    schema = {"type": "object", "properties": {"key": {"type": "string", "maxLength": 20}}, "required": ["key"],
              "additionalProperties": False}  # {"key": " is forced, the string after it free
    f = fmt("json_schema", schema)
    prompt = "x " * 30  # 60 tokens: the forced key would carry the prefill past position 64
    assert 50 < len(engine.encode(prompt)) < 64
    base = run(engine, f, Method.NONE, prompt=prompt, max_new=30, logprobs=True)
    for method in (Method.NGRAM, Method.DRAFT):
        spec = run(engine, f, method, prompt=prompt, max_new=30, logprobs=True)
        assert spec[0] == base[0] and spec[3] == base[3], method


def test_a_batch_mixing_formats_and_free_text_equals_each_alone(engine):
    """Constrained and free sequences stepped together (shared forwards, one verify call) give what each gives
    alone: masks stay with their own rows."""
    reqs = [(fmt("json_schema", SCHEMAS[0]), Method.DRAFT), (None, Method.DRAFT), (fmt("regex", "[0-9]{2}-[a-z]+"), Method.NGRAM),
            (fmt("json_schema", SCHEMAS[6]), Method.AUTO)]  # fmt: skip
    alone = [run(engine, f, m, max_new=40)[0] for f, m in reqs]
    seqs = [engine.start(GenerationRequest(prompt_ids=engine.encode("def add(a, b):"), max_new_tokens=40,
                                           response_format=f, speculation=SpeculationParams(method=m)))
            for f, m in reqs]  # fmt: skip
    live = list(seqs)
    while live:
        engine.step_batch(live)
        live = [s for s in live if not s.finished]
    assert [s.output_ids for s in seqs] == alone
