"""Property tests (hypothesis) for specdec.kernels over shapes, dtypes and sampling parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_kernels_ref as ref
from specdec import kernels as K

# derandomize: the examples are the same on every run, so CI never flakes on a lucky draw.
SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def row_params(draw, V):
    greedy = draw(st.booleans())
    if greedy and draw(st.booleans()):
        return (0.0, 0, 1.0, 0.0)
    t = 0.0 if greedy else draw(st.sampled_from([0.25, 0.5, 1.0, 1.7]) | st.floats(0.05, 4.0))
    k = draw(st.sampled_from([0, 1, 2, V, V + 3]) | st.integers(0, max(1, V)))
    p = draw(st.sampled_from([1.0, 0.5, 0.9]) | st.floats(0.01, 1.0))
    m = draw(st.sampled_from([0.0, 0.1]) | st.floats(0.0, 0.9))
    return (t, k, p, m)


@st.composite
def logits_matrix(draw, rows, V):
    kind = draw(st.sampled_from(["normal", "ties", "wide", "peaked"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, V)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    elif kind == "ties":
        x = rng.integers(-2, 3, size=(rows, V)).astype(np.float64)
    elif kind == "wide":
        x = rng.uniform(-200, 200, size=(rows, V))
    else:
        x = rng.standard_normal((rows, V))
        x[np.arange(rows), rng.integers(0, V, rows)] += 12.0
    return x.astype(np.float32)


def _cols(params):
    t, k, p, m = (np.array(c) for c in zip(*params))
    return dict(temperature=t, top_k=k.astype(np.int64), top_p=p, min_p=m)


@SETTINGS
@given(data=st.data(), B=st.integers(1, 5), V=st.integers(1, 300), bf16=st.booleans())
def test_sample_properties(data, B, V, bf16):
    logits = data.draw(logits_matrix(B, V))
    if bf16:
        t = torch.from_numpy(logits).bfloat16()
        logits = t.float().numpy()
        inp = t
    else:
        inp = logits
    params = [data.draw(row_params(V)) for _ in range(B)]
    seeds = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=B, max_size=B)), dtype=np.uint64)
    offs = np.array(data.draw(st.lists(st.integers(0, 2**64 - 1), min_size=B, max_size=B)), dtype=np.uint64)
    toks, probs = K.sample(inp, seed=seeds, offset=offs, return_probs=True, **_cols(params))
    toks, probs = np.asarray(toks), np.asarray(probs)
    assert toks.dtype == np.int64 and probs.dtype == np.float32 and probs.shape == (B, V)
    assert ((0 <= toks) & (toks < V)).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs[np.arange(B), toks] > 0).all()
    u0 = K.uniforms(seeds, offs, 1)[:, 0]
    np.testing.assert_array_equal(toks, ref.sample(logits, params, u0))
    for b in range(B):
        np.testing.assert_allclose(probs[b], ref.process(logits[b], *params[b]), rtol=3e-6, atol=1e-7)
        # each row alone gives the same token
        one = K.sample(inp[b : b + 1], seed=seeds[b : b + 1], offset=offs[b : b + 1], **_cols(params[b : b + 1]))
        assert int(one[0]) == int(toks[b])


@SETTINGS
@given(data=st.data(), B=st.integers(1, 4), Kd=st.integers(0, 4), V=st.integers(1, 200), with_q=st.booleans())
def test_verify_properties(data, B, Kd, V, with_q):
    logits = data.draw(logits_matrix(B * (Kd + 1), V)).reshape(B, Kd + 1, V)
    params = [data.draw(row_params(V)) for _ in range(B)]
    nd = np.array(data.draw(st.lists(st.integers(0, Kd), min_size=B, max_size=B)), dtype=np.int32)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    drafts = np.where(rng.random((B, Kd)) < 0.6, logits[:, :Kd].argmax(-1) if Kd else 0, rng.integers(0, V, (B, Kd)))
    drafts = drafts.reshape(B, Kd).astype(np.int64)
    q = None
    if with_q:
        ql = logits[:, :Kd] + rng.standard_normal((B, Kd, V)).astype(np.float32)
        q = np.zeros((B, Kd, V), np.float32)
        for b in range(B):
            for j in range(Kd):
                q[b, j] = ref.process(ql[b, j], *params[b])
        # A drafter samples x from q, so q(x) > 0: a draw outside q's support is no input verify can get.
        b_idx, j_idx = np.nonzero(np.take_along_axis(q, drafts[..., None], axis=-1)[..., 0] == 0)
        drafts[b_idx, j_idx] = q[b_idx, j_idx].argmax(-1)
    seeds = rng.integers(0, 2**64 - 1, size=B, dtype=np.uint64)
    offs = rng.integers(0, 2**64 - 1, size=B, dtype=np.uint64)
    tokens, nacc = K.verify(logits, drafts, q, nd, seed=seeds, offset=offs, **_cols(params))
    assert tokens.shape == (B, Kd + 1) and nacc.dtype == np.int32
    u = K.uniforms(seeds, offs, 2 * Kd + 2, stream=K.STREAM_VERIFY)
    for b in range(B):
        n = int(nacc[b])
        assert 0 <= n <= nd[b]
        assert (tokens[b, :n] == drafts[b, :n]).all()
        assert 0 <= tokens[b, n] < V
        assert (tokens[b, n + 1 :] == -1).all()
        lps = K.logprobs(logits[b, : n + 1], tokens[b, : n + 1], **_cols([params[b]] * (n + 1)))[0]
        assert np.isfinite(lps).all() and (lps <= 1e-6).all()  # every emitted token was drawable
        rt, rn = ref.verify_row(logits[b], drafts[b], None if q is None else q[b], int(nd[b]), params[b], u[b])
        assert (tokens[b].tolist(), n) == (rt, rn)
        alone = K.verify(logits[b : b + 1], drafts[b : b + 1], None if q is None else q[b : b + 1], nd[b : b + 1],
                         seed=seeds[b : b + 1], offset=offs[b : b + 1], **_cols(params[b : b + 1]))
        assert alone[0][0].tolist() == tokens[b].tolist()


@SETTINGS
@given(
    temperature=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5)),
    top_k=st.integers(-3, 10),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    min_p=st.floats(allow_nan=True, allow_infinity=True),
)
def test_any_parameters_either_work_or_raise_value_error(temperature, top_k, top_p, min_p):
    logits = np.random.default_rng(0).standard_normal((2, 3, 17)).astype(np.float32)
    valid = (np.isfinite(temperature) and temperature >= 0 and top_k >= 0 and 0 < top_p <= 1 and 0 <= min_p < 1)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if valid:
        assert K.sample(logits[:, 0], **kw).shape == (2,)
        assert K.verify(logits, np.zeros((2, 2), np.int64), None, [2, 1], **kw)[0].shape == (2, 3)
    else:
        with pytest.raises(ValueError):
            K.sample(logits[:, 0], **kw)
        with pytest.raises(ValueError):
            K.verify(logits, np.zeros((2, 2), np.int64), None, [2, 1], **kw)
