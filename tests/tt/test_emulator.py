"""The real kernels (reader.cpp, writer.cpp, softmax_numerator.cpp), run on the host by
csrc/tt/host/emulator.cpp (a thread per kernel per core; stand-in dataflow and compute APIs with
circular-buffer ring checks, NOC copies, semaphores, dest-register and init-order checks), from the
plan of python/specdec/tt/program.py, against the tile model.  numpy + g++ only (no ttnn).

This checks the kernels' logic, protocol (rounds, record layouts, semaphore counts), CB usage and the
plan's buffer sizes and argument lists; it cannot check hardware behaviour (NOC ordering, caches,
the SFPU's actual arithmetic, the LLK's real requirements beyond the ones the stand-in enforces).
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from specdec.tt import model as m
from specdec.tt import program as P

ROOT = Path(__file__).resolve().parents[2]
TOK = {"logits": 0x100000, "params": 0x200000, "q": 0x300000, "out": 0x400000}


def _noc_xy(core):
    return core[0] + 18, core[1] + 18


def _tiles(a: np.ndarray) -> np.ndarray:
    """Row-major [32*RT, 32*VT] -> tile order (row of tiles major), 16x16 faces inside each tile."""
    R, C = a.shape
    return a.reshape(R // 32, 2, 16, C // 32, 2, 16).transpose(0, 3, 1, 4, 2, 5).reshape(-1)


_BUILT: dict = {}


def _compile(gxx, out: Path, src: Path, ct, name: str | None) -> Path:
    cmd = [gxx, "-O1", "-std=c++17", "-pthread", f"-I{ROOT / 'csrc/tt/host/emu'}",
           f"-DKERNEL_COMPILE_TIME_ARGS={','.join(map(str, ct))}"]
    if name:
        cmd.append(f"-Dkernel_main={name}")
    subprocess.run([*cmd, "-c", str(src), "-o", str(out)], check=True)
    return out


def _build(tmp: Path, p: P.Plan) -> Path:
    """The emulator for this plan's compile-time args (units shared between plans are built once)."""
    gxx = shutil.which("g++")
    acc = {"logits": [2, p.x_tile_bytes], "params": [2, 64], "q": [2, 4096], "out": [2, p.out_row_words * 4]}
    if not p.has_q:
        acc.pop("q")
    rct, wct = p.reader_compile_args(acc), p.writer_compile_args(acc)
    key = (tuple(rct), tuple(wct))
    if key in _BUILT:
        return _BUILT[key]
    tag = str(abs(hash(key)))
    kd = ROOT / "csrc/tt/kernels"
    if "common" not in _BUILT:
        _BUILT["common"] = (
            _compile(gxx, tmp / "compute.o", kd / "compute/softmax_numerator.cpp", [0], "emu_compute_main"),
            _compile(gxx, tmp / "emulator.o", ROOT / "csrc/tt/host/emulator.cpp", [0], None),
        )
    objs = [*_BUILT["common"],
            _compile(gxx, tmp / f"reader{tag}.o", kd / "dataflow/reader.cpp", rct, "emu_reader_main"),
            _compile(gxx, tmp / f"writer{tag}.o", kd / "dataflow/writer.cpp", wct, "emu_writer_main")]
    exe = tmp / f"emulator{tag}"
    subprocess.run([gxx, "-pthread", *map(str, objs), "-o", str(exe)], check=True)
    _BUILT[key] = exe
    return exe


def _run(tmp: Path, exe: Path, p: P.Plan, x: np.ndarray, q, prm: m.RowParams, bf16: bool) -> np.ndarray:
    R, V = x.shape
    RP, VP = p.row_tiles * 32, p.vocab_tiles * 32
    xp = np.zeros((RP, VP), np.float32)
    xp[:, V:] = 1000.0  # padding columns: chosen by max/sampling if the kernels failed to mask them
    xp[:R, :V] = x
    xt = _tiles(xp)
    if bf16:
        xt = (xt.view(np.uint32) >> 16).astype(np.uint16)
    files = {"logits": xt.tobytes()}
    params = np.zeros((RP, 16), np.uint32)
    params[:R] = m.pack_params(prm)
    files["params"] = params.tobytes()
    if q is not None:
        qp = np.zeros((RP, VP), np.float32)
        qp[:R, :V] = q
        files["q"] = _tiles(qp).tobytes()
    out_bytes = p.B * p.out_row_words * 4
    files["out"] = (np.full(out_bytes // 4, 0xDEADBEEF, np.uint32)).tobytes()
    addr = {k: TOK[k] for k in files}
    cores = [*p.workers, p.aggregator]
    lines = ["l1 1572864", "timeout 60"]
    for i, c in enumerate(cores):
        lines.append(f"core {i} {_noc_xy(c)[0]} {_noc_xy(c)[1]}")
    for i, c in enumerate(cores):
        for cb in p.cbs_on(c):
            fmt = {"float32": 0, "bfloat16": 1, "uint32": 2}[cb.dtype]
            lines.append(f"cb {i} {cb.index} {cb.page_size} {cb.pages} {fmt}")
    idx = {c: i for i, c in enumerate(cores)}
    for who, args in (("reader", p.reader_runtime_args(addr)), ("compute", p.compute_runtime_args()),
                      ("writer", p.writer_runtime_args(addr, _noc_xy))):
        for c, a in args.items():
            lines.append(f"rt {who} {idx[c]} {len(a)} " + " ".join(map(str, a)))
    for k, blob in files.items():
        path = tmp / f"{k}.bin"
        path.write_bytes(blob)
        lines.append(f"{'out' if k == 'out' else 'tensor'} {TOK[k]} {path} {len(blob)}")
    (tmp / "config.txt").write_text("\n".join(lines) + "\n")
    r = subprocess.run([str(exe), str(tmp / "config.txt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.frombuffer((tmp / "out.bin").read_bytes(), np.uint32).reshape(p.B, p.out_row_words)


CASES = [
    # B, K, V, grid, bf16, dense draft probs, filters
    (3, 4, 1000, (3, 3), True, True, "mixed"),    # 15 rows; 8 workers, uneven split (group1 and group2)
    (9, 4, 777, (3, 2), False, False, "mixed"),   # 45 rows: two tile-rows (CB rings must stay contiguous)
    (40, 0, 2100, (2, 3), True, False, "mixed"),  # sample: 40 rows, V not a multiple of 32
    # the searches a tile-row runs depend on its rows' filters (search_rounds): none, top-k alone, top-p alone
    (9, 4, 777, (3, 2), False, True, "none"),
    (9, 4, 777, (3, 2), False, True, "top_k"),
    (9, 4, 777, (3, 2), False, True, "top_p"),
]


def _filters(rng, B, kind):
    """Per-row temperature, top_k, top_p, min_p for a case; min-p stays in every kind (it needs no search)."""
    temp = np.where(np.arange(B) % 4 == 0, 0.0, rng.uniform(0.4, 1.3, B))
    top_k = np.where(np.arange(B) % 3 == 0, rng.integers(1, 60, B), 0)
    top_p = np.where(np.arange(B) % 2 == 0, rng.uniform(0.5, 0.99, B), 1.0)
    min_p = np.where(np.arange(B) % 5 == 1, 0.05, 0.0)
    if kind in ("none", "top_p"):
        top_k = np.zeros(B, np.int64)
    if kind in ("none", "top_k"):
        top_p = np.ones(B)
    return temp, top_k, top_p, min_p


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("B,K,V,grid,bf16,dense,filters", CASES)
def test_emulated_program_equals_model(tmp_path, tmp_path_factory, B, K, V, grid, bf16, dense, filters):
    rng = np.random.default_rng(B * 100 + K)
    tl = (rng.standard_normal((B, K + 1, V)) * 3).astype(np.float32)
    if bf16:
        tl = m.bf16_round(tl)
    temp, top_k, top_p, min_p = _filters(rng, B, filters)
    nd = rng.integers(0, K + 1, B)
    q = None
    if dense and K:
        q = rng.dirichlet(np.ones(V) * 0.5, (B, K)).astype(np.float32)
    draft = np.where(rng.random((B, K)) < 0.6, tl[:, :K].argmax(-1), rng.integers(0, V, (B, K))) if K else \
        np.zeros((B, 0), np.int64)
    U = rng.random((B, 2 * (K + 1)))
    prm = m.row_params(B, K, nd, draft, temp, top_k, top_p, min_p, U[:, 0::2], U[:, 1::2])
    qrows = None
    if q is not None:
        qrows = np.zeros((B, K + 1, V), np.float32)
        qrows[:, :K] = q
        qrows = qrows.reshape(B * (K + 1), V)
    p = P.plan(B, K, V, logits_dtype="bfloat16" if bf16 else "float32", has_q=q is not None, grid=grid)
    assert len(p.groups["group2"]) > 0 or p.vocab_tiles % p.n_workers == 0
    exe = _build(tmp_path_factory.mktemp("emu"), p)
    out = _run(tmp_path, exe, p, tl.reshape(B * (K + 1), V), qrows, prm, bf16)
    want_tok, want_n = m.verify(tl, draft, q, nd, temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                                u_accept=U[:, 0::2], u_sample=U[:, 1::2], n_workers=p.n_workers)
    raw = out[:, : K + 1].astype(np.int64)
    tokens = np.where(raw == 0xFFFFFFFF, -1, raw)
    np.testing.assert_array_equal(out[:, K + 1].astype(np.int64), want_n)
    np.testing.assert_array_equal(tokens, want_tok)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_emulator_catches_a_wrapping_slice_buffer(tmp_path, tmp_path_factory):
    """Negative control: one CB size for all workers (the plan's first version) makes the workers with
    one tile less wrap their resident slice on the second tile-row; the emulator must refuse it."""
    B, K, V = 40, 0, 2100
    p = P.plan(B, K, V, logits_dtype="bfloat16", has_q=False, grid=(2, 3))  # same build as a case above
    n1 = max(n for _, n in p.split)
    assert p.row_tiles == 2 and p.groups["group2"]
    p.cbs["e_group2"].pages = n1  # the bug
    exe = _build(tmp_path_factory.mktemp("emu"), p)
    rng = np.random.default_rng(0)
    x = m.bf16_round(rng.standard_normal((B, V)).astype(np.float32))
    U = rng.random((B, 2))
    prm = m.row_params(B, 0, np.zeros(B, np.int64), np.zeros((B, 0)), 0.8, 0, 1.0, 0.0, U[:, :1], U[:, 1:])
    with pytest.raises(AssertionError, match="not contiguous"):
        _run(tmp_path, exe, p, x, None, prm, bf16=True)
