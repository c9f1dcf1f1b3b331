"""Cost of a target forward over k new tokens (with a KV cache), torch's linear vs the small-M kernel.

Speculative decoding pays off only if verifying k tokens costs about one decode step. This measures it
for k = 1, 2, 3, 5, 8 on the default target (or --target DIR), both ways in the same run, interleaved,
and reports medians and the ratio to k = 1. It also checks batch invariance: with the small-M kernel the
logits of a verify forward equal those of one-token decode steps bit for bit.

    python bench/verify_cost.py [--target DIR] [--context 128] [--repeats 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import types

from specdec.openmp import passive_waits

passive_waits()  # before torch loads OpenMP

# ruff: noqa: E402
import torch

from specdec.models import linear as fast_linear
from specdec.models.loading import load_model, set_threads

KS = [1, 2, 3, 5, 8]


def forward_seconds(model, cache, context: int, k: int) -> float:
    cache.crop(context)
    ids = torch.randint(0, 1000, (1, k))
    t0 = time.perf_counter()
    hidden = model.base_model(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
    model.get_output_embeddings()(hidden)
    return time.perf_counter() - t0


def set_kernel(model, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if on:
                module.forward = types.MethodType(fast_linear._forward, module)
            elif "forward" in module.__dict__:
                del module.forward


def batch_invariant(model, context_ids: list[int], k: int) -> bool:
    """Verify logits over k tokens == the logits of k one-token decode steps, bit for bit."""
    with torch.inference_mode():
        prefix = model.base_model(input_ids=torch.tensor([context_ids]), use_cache=True).past_key_values
        new = torch.randint(0, min(1000, model.config.vocab_size), (1, k))
        base = len(context_ids)
        verify = model.get_output_embeddings()(model.base_model(input_ids=new, past_key_values=prefix, use_cache=True).last_hidden_state)[0]
        prefix.crop(base)
        steps = [
            model.get_output_embeddings()(model.base_model(input_ids=new[:, i : i + 1], past_key_values=prefix, use_cache=True).last_hidden_state)[0, 0]
            for i in range(k)
        ]
    return bool(torch.equal(verify, torch.stack(steps)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="model directory, hub id or .gguf (default: the demo target)")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json")
    args = ap.parse_args()
    set_threads(args.threads)
    if args.target is None:
        from specdec.models.fetch import default_pair

        args.target = default_pair()[0]
    model = load_model(args.target, dtype="float32").model
    ids = torch.randint(0, 1000, (1, args.context))
    with torch.inference_mode():
        cache = model.base_model(input_ids=ids, use_cache=True).past_key_values
        times: dict[str, dict[int, list[float]]] = {"torch": {k: [] for k in KS}, "kernel": {k: [] for k in KS}}
        for r in range(args.repeats + 1):  # the first round is a warm-up
            for way in times:
                set_kernel(model, way == "kernel")
                # Rotated each round, so that no k always runs right after the same forward. In a fixed order the
                # kernel's k = 1 always followed torch's k = 8 and measured 180 ms, against 207 ms rotated (k = 8:
                # 242 and 244 ms), which overstated every ratio to k = 1.
                for k in KS[r % len(KS):] + KS[: r % len(KS)]:
                    times[way][k].append(forward_seconds(model, cache, args.context, k))
    med = {way: {k: statistics.median(v[1:]) for k, v in t.items()} for way, t in times.items()}
    print(f"target forward over k new tokens, context {args.context}, median of {args.repeats} (ms; ratio to k=1)")
    print(f"{'k':>3} | {'torch':>16} | {'small-M kernel':>16} | kernel ÷ torch")
    for k in KS:
        t, s = med["torch"][k], med["kernel"][k]
        print(f"{k:>3} | {t*1e3:8.1f} ({t/med['torch'][1]:4.2f}×) | {s*1e3:8.1f} ({s/med['kernel'][1]:4.2f}×) | {s/t:5.2f}")
    set_kernel(model, True)
    invariant = {k: batch_invariant(model, ids[0, :32].tolist(), k) for k in (2, 5, 8)}
    print(f"batch-invariant logits (verify == decode steps, bitwise): {invariant}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"context": args.context, "median_s": med, "batch_invariant": invariant}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
