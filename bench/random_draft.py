"""Write a draft that never agrees: the default draft's architecture and tokenizer with random weights.

It measures the adaptive γ policy's floor. Such a draft costs what the real one costs but its proposals
are almost never accepted, so speculating only loses time; the policy must notice and keep speculative
tokens/s close to the baseline's (the goal: at least 0.95×).

    python bench/random_draft.py OUT_DIR [--like DIR_OR_GGUF] [--seed 0]
    specdec bench --draft OUT_DIR --max-new-tokens 64
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="directory to write")
    ap.add_argument("--like", help="model directory or .gguf file to copy the config and tokenizer from "
                    "(default: the default draft)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.like is None:
        from specdec.models.fetch import default_pair

        args.like = default_pair()[1]
    if args.like.endswith(".gguf"):
        from specdec.models.gguf_convert import ensure_metadata

        args.like = str(ensure_metadata(args.like))
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(args.like)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(args.like).save_pretrained(args.out)
    print(f"random-weight copy of {args.like} written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
