"""The tile-faithful model of the tt-metal program, against the exact C++ kernels and against the
device kernels' own integer code (compiled for the host).  numpy + specdec.kernels only: no ttnn.

Stated tolerances (see docs/tenstorrent.md):
* tokens and num_accepted: identical to the C++ kernels given the same Philox uniforms, except where
  a uniform lies within 1e-6 of a CDF or acceptance boundary (none occur on these seeds);
* processed probabilities p = w / Z: |p_model - p_cpu| <= 1e-6, same support except tokens with
  p_cpu < 1e-9 (the device's 2^-32 fixed point truncates them to 0).
"""
from __future__ import annotations

import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from specdec.tt import model as m

ROOT = Path(__file__).resolve().parents[2]
kernels = pytest.importorskip("specdec.kernels", reason="the C++ kernels (specdec._kernels) are not built")


def _rand_params(rng, B, V):
    temp = np.where(rng.random(B) < 0.2, 0.0, rng.uniform(0.3, 1.5, B))
    top_k = np.where(rng.random(B) < 0.5, 0, rng.integers(1, V + 1, B))
    top_p = np.where(rng.random(B) < 0.5, 1.0, rng.uniform(0.3, 1.0, B))
    min_p = np.where(rng.random(B) < 0.7, 0.0, rng.uniform(0.0, 0.3, B))
    seed = rng.integers(0, 2**63, B).astype(np.uint64)
    offset = rng.integers(0, 1000, B).astype(np.uint64)
    return dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p), seed, offset


def _verify_both(rng, B, K, V, with_q, swap_uniforms=False):
    tl = (rng.standard_normal((B, K + 1, V)) * rng.uniform(0.5, 4)).astype(np.float32)
    prm, seed, offset = _rand_params(rng, B, V)
    nd = rng.integers(0, K + 1, B).astype(np.int32)
    if with_q and K:
        dl = (rng.standard_normal((B * K, V)) * 2).astype(np.float32)
        _, q = kernels.sample(dl, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1, offset=0, return_probs=True)
        q = np.asarray(q, dtype=np.float32).reshape(B, K, V)
        qd = q.astype(np.float64)
        draft = np.array([[rng.choice(V, p=qd[b, j] / qd[b, j].sum()) for j in range(K)] for b in range(B)],
                         dtype=np.int64).reshape(B, K)
    else:
        q = None
        draft = rng.integers(0, V, (B, K)).astype(np.int64)
        draft = np.where(rng.random((B, K)) < 0.6, tl[:, :K].argmax(-1), draft)
    tok, na = kernels.verify(tl, draft, q, nd, seed=seed, offset=offset, **prm)
    U = kernels.uniforms(seed, offset, 2 * (K + 1), stream=kernels.STREAM_VERIFY)
    ua, us = U[:, 0::2], U[:, 1::2]
    if swap_uniforms:
        ua, us = us, ua
    mt, mn = m.verify(tl, draft, q, nd, u_accept=ua, u_sample=us, n_workers=int(rng.integers(1, 64)), **prm)
    return np.asarray(tok), np.asarray(na), mt, mn


def test_model_verify_matches_cpp_kernels():
    rng = np.random.default_rng(5)
    rows = bad = 0
    for trial in range(60):
        B, K, V = int(rng.integers(1, 9)), int(rng.integers(0, 5)), int(rng.integers(2, 3000))
        tok, na, mt, mn = _verify_both(rng, B, K, V, with_q=bool(trial % 2))
        rows += B
        bad += int(((tok != mt).any(1) | (na != mn)).sum())
    assert rows > 250
    assert bad == 0, f"{bad} of {rows} rows differ from the C++ kernels"


def test_negative_control_swapped_uniforms_disagree():
    """The same comparison must fail for a wrong device rule: accept/sample uniforms swapped."""
    rng = np.random.default_rng(5)
    rows = bad = 0
    for trial in range(60):
        B, K, V = int(rng.integers(1, 9)), int(rng.integers(1, 5)), int(rng.integers(2, 3000))
        tok, na, mt, mn = _verify_both(rng, B, K, V, with_q=bool(trial % 2), swap_uniforms=True)
        rows += B
        bad += int(((tok != mt).any(1) | (na != mn)).sum())
    assert bad > 0.2 * rows


@pytest.mark.parametrize("bf16", [False, True])
def test_model_probabilities_and_samples_match_cpp(bf16):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7 + bf16)
    for _ in range(20):
        B, V = int(rng.integers(1, 9)), int(rng.integers(2, 5000))
        lg = (rng.standard_normal((B, V)) * rng.uniform(0.5, 5)).astype(np.float32)
        prm, seed, offset = _rand_params(rng, B, V)
        inp = lg
        if bf16:
            inp = torch.from_numpy(lg).to(torch.bfloat16)
            lg = inp.float().numpy()
        tok, p = kernels.sample(inp, seed=seed, offset=offset, return_probs=True, **prm)
        tok, p = np.asarray(tok), np.asarray(p, dtype=np.float64)
        u = kernels.uniforms(seed, offset, 1, stream=kernels.STREAM_SAMPLE)
        rp = m.row_params(B, 0, np.zeros(B, np.int64), np.zeros((B, 0)), prm["temperature"], prm["top_k"],
                          prm["top_p"], prm["min_p"], np.zeros((B, 1)), u)
        out = m.forward_rows(lg, None, rp, n_workers=63)
        np.testing.assert_array_equal(out["token"], tok)
        assert (m.sample(lg, u_sample=u, **prm) == tok).all()
        s = ~rp.greedy
        pm = out["w"].astype(np.float64) / out["Z"].astype(np.float64)[:, None]
        assert np.abs(pm[s] - p[s]).max(initial=0) <= 1e-6
        only_cpu = (p[s] > 0) & (pm[s] == 0)
        assert p[s][only_cpu].max(initial=0) < 1e-9
        assert not ((pm[s] > 0) & (p[s] == 0)).any()


def _brute_threshold(e, k, top_p, min_p):
    keys = e.view(np.uint32)
    fx = m.fixed32(e)
    tk = np.sort(keys)[::-1][k - 1] if 0 < k < len(e) else 0
    ink = keys >= tk
    tp = 0
    if top_p < 1:
        pz = Fraction(float(np.float32(top_p))) * int(fx[ink].sum())
        tp = min(v for v in np.unique(keys) if Fraction(int(fx[ink & (keys > v)].sum())) < pz)
    return max(int(tk), int(tp), int(np.float32(min_p).view(np.uint32)))


def test_radix_thresholds_equal_their_definition():
    """The 8-round, 4-bit radix search over per-worker histograms finds exactly the defined keys."""
    rng = np.random.default_rng(0)
    for trial in range(150):
        V, R = int(rng.integers(1, 200)), 3
        x = (rng.standard_normal((R, V)) * rng.uniform(0.1, 8)).astype(np.float32)
        if trial % 3 == 0:
            x = m.bf16_round(x)
        if trial % 5 == 0:
            x[:, : V // 2] = x[:, :1]  # many ties
        prm = m.RowParams(
            greedy=np.zeros(R, bool), inv_t=np.full(R, 1 / 0.7, np.float32), top_k=rng.integers(0, V + 2, R),
            top_p=np.where(rng.random(R) < 0.3, 1.0, rng.uniform(0.01, 1, R)).astype(np.float32),
            min_p=(rng.uniform(0, 0.3, R) * (rng.random(R) < 0.5)).astype(np.float32),
            mode=np.full(R, m.MODE_PLAIN), draft=np.full(R, -1),
            u_accept=m.u32_of(rng.random(R)), u_sample=m.u32_of(rng.random(R)))
        out = m.forward_rows(x, None, prm, n_workers=int(rng.integers(1, 9)))
        for r in range(R):
            want = _brute_threshold(out["e"][r], int(prm.top_k[r]), float(prm.top_p[r]), float(prm.min_p[r]))
            assert int(out["t"][r]) == want, (trial, r)


def test_split_vocab_covers_each_tile_once():
    for vt in (1, 5, 63, 64, 65, 4008, 4748):
        for nw in (1, 7, 63, 128):
            s = m.split_vocab(vt, nw)
            cover = np.zeros(vt, int)
            for first, n in s:
                cover[first : first + n] += 1
            assert (cover == 1).all() and len(s) == min(vt, nw)
            assert max(n for _, n in s) - min(n for _, n in s) <= 1


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: the device kernels' integer code cannot be built for the host")
    exe = tmp_path_factory.mktemp("tt") / "algo_harness"
    subprocess.run([gxx, "-O2", "-std=c++17", "-Wall", "-Werror", "-o", str(exe),
                    str(ROOT / "csrc/tt/host/algo_harness.cpp")], check=True)
    return exe


def test_device_integer_code_is_bit_exact_with_model(harness):
    """csrc/tt/kernels/specdec_tt_algo.hpp (the reader's/writer's arithmetic, worker slices in tile
    layout, aggregator merges) gives the model's argmax, thresholds, Z, accept flags and tokens."""
    rng = np.random.default_rng(1)
    for trial in range(30):
        R, V, nw = int(rng.integers(1, 70)), int(rng.integers(1, 700)), int(rng.integers(1, 12))
        x = (rng.standard_normal((R, V)) * 3).astype(np.float32)
        if trial % 2:
            x = m.bf16_round(x)
        if trial % 3 == 0:
            x[:, : V // 3] = x[:, :1]
        greedy = rng.random(R) < 0.2
        mode = rng.integers(0, 3, R)
        prm = m.RowParams(
            greedy=greedy, inv_t=np.where(greedy, 1, 1 / rng.uniform(0.3, 2, R)).astype(np.float32),
            top_k=rng.integers(0, V + 3, R),
            top_p=np.where(rng.random(R) < 0.5, 1.0, rng.uniform(0, 1, R)).astype(np.float32),
            min_p=(rng.uniform(0, 0.4, R) * (rng.random(R) < 0.4)).astype(np.float32),
            mode=mode, draft=np.where(mode == m.MODE_RESIDUAL, rng.integers(0, V, R), -1),
            u_accept=m.u32_of(rng.random(R)), u_sample=m.u32_of(rng.random(R)))
        q = rng.dirichlet(np.ones(V) * 0.3, R).astype(np.float32) if trial % 2 == 0 else None
        out = m.forward_rows(x, q, prm, nw)
        blobs = [np.array([R, V, nw, int(q is not None)], np.uint32), x.view(np.uint32).ravel(),
                 out["e"].view(np.uint32).ravel()]
        if q is not None:
            blobs.append(q.view(np.uint32).ravel())
        blobs.append(m.pack_params(prm).ravel())
        res = subprocess.run([str(harness)], input=b"".join(b.tobytes() for b in blobs), capture_output=True,
                             check=True)
        h = np.array([ln.split() for ln in res.stdout.decode().splitlines()], dtype=np.uint64).reshape(-1, 6)
        assert h.shape[0] == R
        np.testing.assert_array_equal(h[:, 0], out["argmax"])
        np.testing.assert_array_equal(h[:, 1], out["t"])
        np.testing.assert_array_equal(h[:, 2] + (h[:, 3] << np.uint64(32)), out["Z"])
        resid = prm.mode == m.MODE_RESIDUAL
        np.testing.assert_array_equal(h[resid, 4].astype(bool), out["accept"][resid])
        np.testing.assert_array_equal(h[:, 5], out["token"])


def test_fixed_point_helpers():
    v = np.array([0.0, 2.0**-40, 2.0**-25, 0.3, 0.5, 1.0], np.float32)
    want = [int(Fraction(float(a)) * 2**32) for a in v]
    assert m.fixed32(v).tolist() == want
    a = np.array([0, 1, 2**31, 2**32 - 1, 2**32], np.uint64)
    big = np.uint64(2**49 + 12345)
    assert m.mulhi(a, big).tolist() == [(int(x) * int(big)) >> 32 for x in a]
    assert m.mulhi_ceil(a, big).tolist() == [-((-int(x) * int(big)) >> 32) for x in a]
    assert m.u32_of([0.0, 0.5, 1 - 2.0**-53]).tolist() == [0, 2**31, 2**32 - 1]
