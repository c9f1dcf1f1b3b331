"""Perplexity of the target as stored (GGUF, the quantised kernel) against the same file dequantised to float32.

The text is fixed and committed (bench/data/perplexity.txt: prose and Python code, a snapshot of the project's own
docs/ARCHITECTURE.md and engine/gamma.py). It is scored in non-overlapping windows of --window tokens, each token
given the ones before it in its window; perplexity = exp(mean negative log-likelihood). Both run through the
engine's forward (``models.decoder.Decoder``: a window is a prompt chunk, so the quantised linears take the
dequantise-and-GEMM path, ``quant.Bound.gemm``), and the same forwards time the prefill: tokens scored per second,
for each precision, in the same run (every position's logits, where a prompt needs only its last).

    python bench/perplexity.py [--target FILE.gguf] [--window 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from specdec import torch_env

torch_env.prepare()  # before torch loads its libraries

# ruff: noqa: E402
import torch

from specdec.bench.environment import host_info, rss_bytes
from specdec.models import ragged
from specdec.models.decoder import Decoder
from specdec.models.fetch import default_pair
from specdec.models.loading import load_model

TEXT = Path(__file__).parent / "data" / "perplexity.txt"


def score(model, ids: list[int], window: int) -> tuple[float, int, float]:
    """(total negative log-likelihood, tokens scored, seconds in forwards)."""
    nll, scored, seconds = 0.0, 0, 0.0
    decoder = Decoder(model)
    vocab = model.get_output_embeddings().out_features
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, window):
            chunk = ids[start : start + window]
            if len(chunk) < 2:
                break
            t0 = time.perf_counter()
            _, [logits] = decoder.forward([ragged.Row(None, 0, chunk, list(range(len(chunk) - 1)))], vocab)
            seconds += time.perf_counter() - t0
            nll -= torch.log_softmax(logits.double(), -1).gather(1, torch.tensor(chunk[1:])[:, None]).sum().item()
            scored += len(chunk) - 1
    return nll, scored, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=None, help="a .gguf file (default: the default pair's target)")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    target = args.target or default_pair()[0]
    results = {}
    for precision in ("gguf", "float32"):
        loaded = load_model(target, dtype=precision, device="cpu")
        ids = loaded.tokenizer.encode(TEXT.read_text())
        nll, n, seconds = score(loaded.model, ids, args.window)
        results[precision] = {"perplexity": math.exp(nll / n), "tokens": n, "prefill_tokens_per_s": n / seconds,
                              "rss_bytes": rss_bytes()}  # fmt: skip
        print(f"{precision:8s} perplexity {results[precision]['perplexity']:.4f} over {n} tokens, "
              f"prefill {n / seconds:.1f} tok/s (windows of {args.window})")  # fmt: skip
        del loaded
    ratio = results["gguf"]["perplexity"] / results["float32"]["perplexity"]
    speed = results["gguf"]["prefill_tokens_per_s"] / results["float32"]["prefill_tokens_per_s"]
    print(f"gguf ÷ float32: perplexity {ratio:.4f}, prefill tokens/s {speed:.2f}")
    if args.json:
        out = {"host": host_info(), "threads": torch.get_num_threads(), "target": target, "window": args.window,
               "results": results, "perplexity_ratio": ratio, "prefill_speed_ratio": speed}  # fmt: skip
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
