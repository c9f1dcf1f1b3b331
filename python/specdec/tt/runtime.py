"""``verify`` and ``sample`` on a Tenstorrent card, by either path: stock ttnn operations (``specdec.tt.stock``,
the default) or the custom tt-metal program (``run_rows``, through ``ttnn.generic_op``).

Same contract as ``specdec.kernels.sampling.verify`` / ``sample`` (shapes, per-row parameters, the Philox
uniforms: this module takes them from ``specdec.kernels.sampling.uniforms`` with the CPU kernels' index
mapping, so a device result can be compared with the CPU result draw for draw).  Without ttnn or
without a device every entry point raises RuntimeError saying which is missing.

Neither path has yet run on hardware; see docs/tenstorrent.md.
"""
from __future__ import annotations

import os

import numpy as np

from specdec.tt import model as _model
from specdec.tt import stock as _stock

PATHS = ("stock", "custom")  # stock ttnn operations (the default), or the custom tt-metal program
_DEVICE = None
_OPS: dict = {}  # id(device) -> its TtnnOps


def why_unavailable() -> str | None:
    """None when ttnn imports and a Tenstorrent device can be opened, else the reason."""
    if os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"):
        return "TT_METAL_MOCK_CLUSTER_DESC_PATH is set: a mock cluster has no device to run kernels on"
    try:
        import ttnn
    except Exception as exc:  # ImportError, or a broken install
        return f"ttnn is not importable ({type(exc).__name__}: {exc}); install ttnn==0.81.1 (Python 3.10 or 3.12)"
    try:
        n = ttnn.GetNumAvailableDevices()
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return f"no Tenstorrent device ({type(exc).__name__}: {first})"
    if n < 1:
        return "no Tenstorrent device detected"
    return None


def available() -> bool:
    return why_unavailable() is None


def _require():
    reason = why_unavailable()
    if reason is not None:
        raise RuntimeError(f"specdec.tt: the tt-metal kernels cannot run here: {reason}")
    import ttnn

    return ttnn


def open_device(device_id: int = 0):
    """The device used by default (opened once per process)."""
    global _DEVICE
    ttnn = _require()
    if _DEVICE is None:
        _DEVICE = ttnn.open_device(device_id=device_id)
    return _DEVICE


def _numpy(a, dtype=None):
    if hasattr(a, "detach"):  # torch tensor
        a = a.detach().cpu()
        if str(a.dtype) == "torch.bfloat16":
            a = a.float()
        a = a.numpy()
    return np.asarray(a, dtype=dtype)


def _to_device(ttnn, arr: np.ndarray, dtype, layout, device):
    import torch  # ttnn builds host tensors from torch

    t = torch.from_numpy(np.ascontiguousarray(arr))
    return ttnn.from_torch(t, dtype=dtype, layout=layout, device=device, memory_config=ttnn.DRAM_MEMORY_CONFIG)


def run_rows(logits_rows: np.ndarray, q_rows, prm: "_model.RowParams", B: int, K1: int, *, logits_dtype: str,
             device=None):
    """Run the program on R = B*K1 rows; returns the raw output rows uint32 [B, out_row_words]."""
    ttnn = _require()
    from specdec.tt.program import build_program, plan

    device = device or open_device()
    R, V = logits_rows.shape
    grid = device.compute_with_storage_grid_size()
    arch = "blackhole" if "blackhole" in str(device.arch()).lower() else "wormhole_b0"
    p = plan(B, K1 - 1, V, logits_dtype=logits_dtype, has_q=q_rows is not None, grid=(grid.x, grid.y), arch=arch)
    params = np.zeros((p.row_tiles * 32, 16), dtype=np.uint32)
    params[:R] = _model.pack_params(prm)
    tdt = ttnn.float32 if logits_dtype == "float32" else ttnn.bfloat16
    tensors = {
        "logits": _to_device(ttnn, logits_rows.astype(np.float32), tdt, ttnn.TILE_LAYOUT, device),
        "params": _to_device(ttnn, params.view(np.int32), ttnn.uint32, ttnn.ROW_MAJOR_LAYOUT, device),
    }
    if q_rows is not None:
        tensors["q"] = _to_device(ttnn, q_rows.astype(np.float32), ttnn.float32, ttnn.TILE_LAYOUT, device)
    tensors["out"] = _to_device(ttnn, np.zeros((B, p.out_row_words), np.int32), ttnn.uint32,
                                ttnn.ROW_MAJOR_LAYOUT, device)
    addr = {k: t.buffer_address() for k, t in tensors.items()}
    acc = {k: list(ttnn.TensorAccessorArgs(t).get_compile_time_args()) for k, t in tensors.items()}

    def noc_xy(core):
        c = device.worker_core_from_logical_core(ttnn.CoreCoord(*core))
        return c.x, c.y

    program = build_program(p, addr, acc, noc_xy)
    io = [tensors["logits"], tensors["params"]] + ([tensors["q"]] if q_rows is not None else []) + [tensors["out"]]
    out = ttnn.generic_op(io, program)
    return np.asarray(ttnn.to_torch(out).numpy()).view(np.uint32).reshape(B, p.out_row_words)


def device_ops(device=None):
    """The stock path's operations on ``device`` (the default device when None): one object per device, so that the
    constants it uploads (the column-index tensor) are uploaded once."""
    from specdec.tt.ops_ttnn import TtnnOps

    device = device or open_device()
    if id(device) not in _OPS:
        _OPS[id(device)] = TtnnOps(device)
    return _OPS[id(device)]


def _rows_u64(v, B: int) -> np.ndarray:
    return np.ascontiguousarray(np.broadcast_to(_numpy(v, np.uint64), (B,)))


def _decode(out: np.ndarray, K1: int):
    raw = out[:, :K1].astype(np.int64)
    tokens = np.where(raw == 0xFFFFFFFF, -1, raw)
    return tokens, out[:, K1].astype(np.int32)


def _check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")


def verify(target_logits, draft_tokens, draft_probs, num_draft, *, temperature, top_k, top_p, min_p, seed, offset,
           path: str = "stock", device=None):
    """``specdec.kernels.sampling.verify`` on a Tenstorrent device -> (tokens int64 [B, K+1], num_accepted int32 [B]);
    ``path`` "stock" (ttnn operations, ``specdec.tt.stock``) or "custom" (the tt-metal program)."""
    _check_path(path)
    _require()
    from specdec.kernels import sampling as kernels  # here: the descriptor tests import this module without the C++ build

    is_bf16 = "bfloat16" in str(getattr(target_logits, "dtype", ""))
    tl = _numpy(target_logits, np.float32)
    if tl.ndim != 3:
        raise ValueError(f"target_logits must be [B, K+1, V], got shape {tl.shape}")
    B, K1, V = tl.shape
    K = K1 - 1
    dt = _numpy(draft_tokens, np.int64).reshape(B, K)
    nd = np.broadcast_to(_numpy(num_draft, np.int64), (B,))
    if ((nd < 0) | (nd > K)).any():
        raise ValueError("num_draft must be in [0, K]")
    if not np.isfinite(tl).all():
        raise ValueError("target_logits contain NaN or Inf")
    seed, offset = _rows_u64(seed, B), _rows_u64(offset, B)
    U = kernels.uniforms(seed, offset, 2 * K1, stream=kernels.STREAM_VERIFY).reshape(B, 2 * K1)
    q = None if draft_probs is None else _numpy(draft_probs, np.float32).reshape(B, K, V)
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if path == "stock":
        return _stock.verify(device_ops(device), tl, dt, q, nd, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **filters)
    prm = _model.row_params(B, K, nd, dt, u_accept=U[:, 0::2], u_sample=U[:, 1::2], **filters)
    q_rows = None
    if q is not None:
        q_rows = np.zeros((B, K1, V), np.float32)
        q_rows[:, :K] = q
        q_rows = q_rows.reshape(B * K1, V)
    out = run_rows(tl.reshape(B * K1, V), q_rows, prm, B, K1, logits_dtype="bfloat16" if is_bf16 else "float32",
                   device=device)
    return _decode(out, K1)


def sample(logits, *, temperature, top_k, top_p, min_p, seed, offset, path: str = "stock", device=None):
    """``specdec.kernels.sampling.sample`` on a Tenstorrent device -> tokens int64 [B]; ``path`` as in ``verify``."""
    _check_path(path)
    _require()
    from specdec.kernels import sampling as kernels

    is_bf16 = "bfloat16" in str(getattr(logits, "dtype", ""))
    lg = _numpy(logits, np.float32)
    if lg.ndim != 2:
        raise ValueError(f"logits must be [B, V], got shape {lg.shape}")
    if not np.isfinite(lg).all():
        raise ValueError("logits contain NaN or Inf")
    B, V = lg.shape
    seed, offset = _rows_u64(seed, B), _rows_u64(offset, B)
    u = kernels.uniforms(seed, offset, 1, stream=kernels.STREAM_SAMPLE).reshape(B, 1)
    filters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    if path == "stock":
        return _stock.sample(device_ops(device), lg, u_sample=u[:, 0], **filters)
    prm = _model.row_params(B, 0, np.zeros(B, np.int64), np.zeros((B, 0), np.int64), u_accept=np.zeros((B, 1)),
                            u_sample=u, **filters)  # fmt: skip
    out = run_rows(lg, None, prm, B, 1, logits_dtype="bfloat16" if is_bf16 else "float32", device=device)
    return _decode(out, 1)[0][:, 0]
