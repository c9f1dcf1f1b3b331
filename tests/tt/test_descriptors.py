"""The program-descriptor builder (python/specdec/tt/program.py) for several (B, K, V), under ttnn 0.81.1
with a mock cluster: core ranges, circular buffers, compile-time and runtime args, vocabulary split.
Runs in the tt job (Python 3.12 venv); skipped where ttnn is not installed.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("ttnn") is None:
    pytest.skip("ttnn is not installed (the tt job installs ttnn==0.81.1 in Python 3.12)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest_tt import use_mock_cluster  # noqa: E402

use_mock_cluster()  # before ttnn is imported
import ttnn  # noqa: E402

from specdec.tt import program as P  # noqa: E402
from specdec.tt.jit_check import KERNELS  # noqa: E402

SHAPES = [(1, 0, 1), (1, 0, 100), (3, 2, 4097), (1, 0, 32000), (8, 4, 128256), (32, 8, 151936), (64, 7, 151936)]
NAMES = ["logits", "params", "q", "out"]


def _fake_tensor_parts():
    addr = {k: 0x10000 * (i + 1) for i, k in enumerate(NAMES)}
    acc = {k: [100 + i, 7, 7] for i, k in enumerate(NAMES)}  # distinguishable per tensor
    return addr, acc


def noc_xy(core):  # a deterministic stand-in for device.worker_core_from_logical_core
    return core[0] + 18, core[1] + 18


def _cores(crs):
    out = set()
    for r in crs.ranges():
        for x in range(r.start.x, r.end.x + 1):
            for y in range(r.start.y, r.end.y + 1):
                out.add((x, y))
    return out


@pytest.mark.parametrize("B,K,V", SHAPES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_plan_split_and_buffers(B, K, V, dtype):
    p = P.plan(B, K, V, logits_dtype=dtype, has_q=K > 0)
    vt = -(-V // 32)
    assert p.vocab_tiles == vt and p.rows == B * (K + 1) and p.row_tiles == -(-p.rows // 32)
    # each vocabulary tile belongs to exactly one worker, in order
    cover = [0] * vt
    for first, n in p.split:
        assert n >= 1
        for t in range(first, first + n):
            cover[t] += 1
    assert cover == [1] * vt
    assert [f for f, _ in p.split] == sorted(f for f, _ in p.split)
    assert p.n_workers == min(vt, 63)
    assert p.aggregator == (7, 7) and p.aggregator not in p.workers
    assert len(set(p.workers)) == p.n_workers
    cb = p.cbs
    assert cb["x"].page_size == (4096 if dtype == "float32" else 2048) and cb["x"].pages == 2
    # every worker's resident e (and q) buffer holds exactly its own slice: pages contiguous per tile-row
    for core, (_, n) in zip(p.workers, p.split):
        mine = {c.index: c for c in p.cbs_on(core)}
        assert mine[P.CB["CB_E"]].pages == n and mine[P.CB["CB_E"]].page_size == 4096
        assert (P.CB["CB_Q"] in mine) == (K > 0) and (K == 0 or mine[P.CB["CB_Q"]].pages == n)
    agg = {c.index for c in p.cbs_on(p.aggregator)}
    assert P.CB["CB_E"] not in agg and P.CB["CB_Q"] not in agg
    # the shared buffers come first (same L1 address on every core), the per-group ones last
    order = [c.on for c in cb.values()]
    assert order == sorted(order, key=lambda on: on != "all")
    assert cb["mailbox"].total_size == p.n_workers * P.REC_BYTES == p.n_workers * 6144
    assert cb["rowres"].total_size == p.row_tiles * 32 * 16
    assert cb["out"].page_size % 64 == 0 and p.out_row_words >= K + 2
    assert p.l1_bytes() <= P.L1_CB_BUDGET["wormhole_b0"]
    assert {c.index for c in cb.values()} == {v for k, v in P.CB.items() if k != "CB_Q" or K > 0}


def test_split_agrees_with_ttnn_split_work_to_cores():
    for vt in (1, 10, 63, 64, 65, 4008, 4748):
        n, _, g1, g2, n1, n2 = ttnn.split_work_to_cores(ttnn.CoreCoord(8, 8), vt)
        ours = [c for _, c in P.split_vocab(vt, 64)]
        want = [n1] * g1.num_cores() + [n2] * g2.num_cores()
        assert len(ours) == n and sorted(ours, reverse=True) == sorted(want, reverse=True)
        assert ours == sorted(ours, reverse=True)  # the larger share goes to the first cores, as ttnn's group 1


def test_budget_is_enforced():
    with pytest.raises(ValueError, match="L1"):
        P.plan(32, 8, 151936, logits_dtype="float32", grid=(2, 2))
    with pytest.raises(ValueError):
        P.plan(0, 1, 100)


@pytest.mark.parametrize("B,K,V", SHAPES)
def test_program_descriptor(B, K, V):
    has_q = K > 0
    p = P.plan(B, K, V, logits_dtype="bfloat16", has_q=has_q)
    addr, acc = _fake_tensor_parts()
    if not has_q:
        addr.pop("q"), acc.pop("q")
    prog = P.build_program(p, addr, acc, noc_xy)
    assert len(prog.kernels) == 3 and len(prog.semaphores) == 2
    reader, compute, writer = prog.kernels
    assert Path(reader.kernel_source) == KERNELS["reader"] and Path(writer.kernel_source) == KERNELS["writer"]
    assert Path(compute.kernel_source) == KERNELS["compute"]
    everyone = set(p.workers) | {p.aggregator}
    assert _cores(reader.core_ranges) == everyone and _cores(writer.core_ranges) == everyone
    assert _cores(compute.core_ranges) == set(p.workers)
    # compile-time args: flags first, then each tensor's TensorAccessorArgs in the kernels' order
    q_acc = acc["q"] if has_q else acc["logits"]
    assert list(reader.compile_time_args) == [0, int(has_q), 2048, *acc["logits"], *acc["params"], *q_acc]
    assert list(writer.compile_time_args) == [int(has_q), p.n_workers, *acc["out"]]
    assert list(compute.compile_time_args) == []
    # runtime args per core
    for w, core in enumerate(p.workers):
        first, n = p.split[w]
        r = list(reader.runtime_args[core[0]][core[1]])
        assert r == [addr["logits"], addr["params"], addr.get("q", addr["logits"]), 0, first, n, p.vocab_tiles, V,
                     p.row_tiles]
        assert list(compute.runtime_args[core[0]][core[1]]) == [n, p.row_tiles]
        wa = list(writer.runtime_args[core[0]][core[1]])
        assert wa[:4] == [0, w, first, n] and wa[4:9] == [V, B * (K + 1), p.row_tiles, B, K + 1]
        assert wa[9] == addr["out"] and wa[11:13] == [25, 25] and wa[13:15] == [P.SEM_AGG, P.SEM_WORK]
        assert len(wa) == 15
    ax, ay = p.aggregator
    wa = list(writer.runtime_args[ax][ay])
    assert wa[0] == 1 and len(wa) == 15 + 2 * p.n_workers
    assert wa[15:] == [c for core in p.workers for c in noc_xy(core)]
    assert list(reader.runtime_args[ax][ay])[3] == 1
    # circular buffers: indices, page sizes, totals, cores
    descs = [(cb.format_descriptors[0].buffer_index, cb.total_size, cb.format_descriptors[0].page_size,
              frozenset(_cores(cb.core_ranges))) for cb in prog.cbs]
    want = [(c.index, c.total_size, c.page_size,
             frozenset(everyone if c.on == "all" else p.groups[c.on])) for c in p.cbs.values()]
    assert descs == want
    assert sorted(s.id for s in prog.semaphores) == [P.SEM_AGG, P.SEM_WORK]
    assert all(s.initial_value == 0 for s in prog.semaphores)


def test_compute_config_keeps_fp32():
    p = P.plan(2, 3, 5000, logits_dtype="float32", has_q=True)
    addr, acc = _fake_tensor_parts()
    prog = P.build_program(p, addr, acc, noc_xy)
    cfg = prog.kernels[1].config
    assert cfg.fp32_dest_acc_en and not cfg.math_approx_mode
    modes = list(cfg.unpack_to_dest_mode)
    fp32_cbs = {c.index for c in p.cbs.values() if c.dtype == "float32"}
    assert fp32_cbs >= {P.CB["CB_X"], P.CB["CB_XMAX"], P.CB["CB_INVT"], P.CB["CB_E"]}
    for i, mode in enumerate(modes):
        assert (mode == ttnn.UnpackToDestMode.UnpackToDestFp32) == (i in fp32_cbs)


def test_device_entry_points_refuse_without_device():
    from specdec.tt import runtime

    reason = runtime.why_unavailable()
    assert reason is not None  # mock cluster: nothing can run
    with pytest.raises(RuntimeError, match="cannot run here"):
        runtime.sample([[0.0, 1.0]], temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0)


def test_large_grid_caps_workers():
    p = P.plan(8, 4, 151936, grid=(13, 10), arch="blackhole")  # Blackhole P150 compute grid
    assert p.n_workers == P.MAX_WORKERS and p.aggregator == (12, 9) and p.aggregator not in p.workers
    assert len(p.writer_runtime_args({"out": 0}, noc_xy)[p.aggregator]) == 15 + 2 * P.MAX_WORKERS
    assert p.l1_bytes() <= P.L1_CB_BUDGET["blackhole"]
