"""One JSON report of both tt paths on this machine's Tenstorrent device, to paste into an issue: versions, then for
the stock-ttnn path and the custom tt-metal program each: agreement with the CPU kernels, a χ² of sampled tokens
against the processed distribution, and per-call timings.

    python -m specdec.tt.hw_report --json tt-report.json       (scripts/tt_validate_hw.sh runs it)

Agreement: the device and the CPU kernels draw with the same Philox uniforms, so their tokens should match except
where the device's exp or sums differ from the CPU's by an ulp at a sampling boundary; greedy must match exactly.
One path failing (a compile error, say) is recorded in its section and does not stop the other. The χ²
asks whether the device's samples of one fixed row follow the processed distribution (the CPU kernels' p), which
stays true even where the bits of single samples differ. Timings are medians of repeated calls, host transfers
included, with the CPU kernels' time on the same inputs beside them.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import platform
import sys
import time

import numpy as np

from specdec.tt import runtime

AGREEMENT_CASES = [(1, 0, 32000, False), (8, 4, 128256, True), (8, 4, 128256, False), (3, 2, 1000, True)]
TIMING_SHAPES = [(1, 4, 128256), (8, 4, 128256), (32, 0, 128256)]
CHI2_DRAWS = 4000


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    device = {}
    try:
        d = runtime.open_device()
        grid = d.compute_with_storage_grid_size()
        device = {"arch": str(d.arch()), "grid": [grid.x, grid.y]}
    except Exception as exc:  # the report still says what it could not open
        device = {"error": f"{type(exc).__name__}: {exc}"}
    return {"python": platform.python_version(), "platform": platform.platform(), "specdec": _version("specdec"),
            "specdec_commit": os.environ.get("SPECDEC_COMMIT", ""), "ttnn": _version("ttnn"), "numpy": np.__version__,
            "torch": _version("torch"), "device": device}  # fmt: skip


def inputs(rng: np.random.Generator, B: int, K: int, V: int, with_q: bool):
    """Random verify inputs (target logits, drafts, dense q or None, num_draft, per-row parameters mixing greedy,
    top-k, top-p and min-p rows), shared with tests/tt/test_device.py."""
    from specdec import kernels

    tl = (rng.standard_normal((B, K + 1, V)) * 3).astype(np.float32)
    prm = dict(temperature=np.where(np.arange(B) % 4 == 0, 0.0, 0.8), top_k=np.where(np.arange(B) % 3 == 0, 50, 0),
               top_p=np.where(np.arange(B) % 2 == 0, 0.9, 1.0), min_p=np.where(np.arange(B) % 5 == 0, 0.05, 0.0),
               seed=np.arange(B, dtype=np.uint64) + 11, offset=np.full(B, 3, np.uint64))  # fmt: skip
    q = None
    if with_q and K:
        _, q = kernels.sample(tl[:, :K].reshape(B * K, V) + 0.5, temperature=1.0, seed=5, offset=0, return_probs=True)
        q = np.asarray(q, np.float32).reshape(B, K, V)
    draft = tl[:, :K].argmax(-1).astype(np.int64) if K else np.zeros((B, 0), np.int64)
    return tl, draft, q, (np.arange(B) % (K + 1)).astype(np.int32), prm


def agreement(cases=AGREEMENT_CASES, path: str = "stock") -> list[dict]:
    """Per (B, K, V, dense q): the share of rows whose tokens or accepted count differ from the CPU kernels'."""
    from specdec import kernels

    out = []
    for B, K, V, with_q in cases:
        tl, draft, q, nd, prm = inputs(np.random.default_rng(B * 1000 + K), B, K, V, with_q)
        dev_tok, dev_n = runtime.verify(tl, draft, q, nd, path=path, **prm)
        cpu_tok, cpu_n = (np.asarray(x) for x in kernels.verify(tl, draft, q, nd, **prm))
        greedy = prm["temperature"] == 0.0
        differ = (dev_tok != cpu_tok).any(1) | (dev_n != cpu_n)
        out.append({"B": B, "K": K, "V": V, "dense_q": with_q, "rows_differing": float(differ.mean()),
                    "greedy_rows_differing": int(differ[greedy].sum())})  # fmt: skip
    return out


def chi_square(draws: int = CHI2_DRAWS, V: int = 64, path: str = "stock") -> dict:
    """``draws`` device samples of one fixed row (temperature 0.8, top-p 0.95), one seed each, against the CPU
    kernels' processed distribution: χ² p-value, cells of expected count < 5 pooled."""
    from scipy.stats import chisquare

    from specdec import kernels

    row = (np.random.default_rng(7).standard_normal(V) * 2).astype(np.float32)
    prm = dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0, offset=0)
    _, p = kernels.sample(row[None], seed=0, return_probs=True, **prm)
    p = np.asarray(p, np.float64)[0]
    tokens = runtime.sample(np.repeat(row[None], draws, 0), seed=np.arange(draws, dtype=np.uint64), path=path, **prm)
    counts = np.bincount(np.asarray(tokens), minlength=V)
    big = p * draws >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big], p[~big].sum()) * draws
    keep = exp > 0
    return {"draws": draws, "V": V, "outside_support": int(counts[p == 0].sum()),
            "p_value": float(chisquare(obs[keep], exp[keep] * obs[keep].sum() / exp[keep].sum()).pvalue)}  # fmt: skip


def timings(shapes=TIMING_SHAPES, repeats: int = 10, path: str = "stock") -> list[dict]:
    """Median seconds per verify call on the device and on the CPU kernels, same inputs (dense q where K > 0)."""
    from specdec import kernels

    out = []
    for B, K, V in shapes:
        tl, draft, q, nd, prm = inputs(np.random.default_rng(B + K), B, K, V, K > 0)
        row = {"B": B, "K": K, "V": V}
        on_device = functools.partial(runtime.verify, path=path)
        for name, fn in (("device_s", on_device), ("cpu_kernels_s", kernels.verify)):
            fn(tl, draft, q, nd, **prm)  # the first call compiles (device) or warms caches (CPU)
            seconds = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn(tl, draft, q, nd, **prm)
                seconds.append(time.perf_counter() - t0)
            row[name] = float(np.median(seconds))
        out.append(row)
    return out


def path_report(path: str, *, agreement_cases=AGREEMENT_CASES, timing_shapes=TIMING_SHAPES,
                chi2_draws: int = CHI2_DRAWS, repeats: int = 10) -> dict:  # fmt: skip
    try:
        return {"agreement": agreement(agreement_cases, path), "chi_square": chi_square(chi2_draws, path=path),
                "timings": timings(timing_shapes, repeats, path)}  # fmt: skip
    except Exception as exc:  # a path that fails to compile or run is reported, and the other still runs
        return {"error": f"{type(exc).__name__}: {exc}"}


def build_report(*, agreement_cases=AGREEMENT_CASES, timing_shapes=TIMING_SHAPES, chi2_draws: int = CHI2_DRAWS,
                 repeats: int = 10) -> dict:  # fmt: skip
    kw = dict(agreement_cases=agreement_cases, timing_shapes=timing_shapes, chi2_draws=chi2_draws, repeats=repeats)
    return {"versions": versions(), "paths": {path: path_report(path, **kw) for path in runtime.PATHS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", dest="json_path", default="tt-report.json", help="where to write the report")
    args = ap.parse_args(argv)
    reason = runtime.why_unavailable()
    if reason is not None:
        print(f"no report: {reason}", file=sys.stderr)
        return 1
    report = build_report()
    text = json.dumps(report, indent=1)
    with open(args.json_path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
