"""``specdec bench``: its flags, and the run they ask for."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specdec.bench.agent_loop import agent_loop_to_markdown, run_agent_loop
from specdec.bench.structured import run_structured, structured_to_markdown
from specdec.bench.concurrency import concurrency_to_markdown, run_concurrency
from specdec.bench.methods import methods_to_markdown, run_methods
from specdec.bench.options import BenchOptions
from specdec.bench.prompts import builtin_prompts, read_prompts
from specdec.bench.report import plot, to_json, to_markdown
from specdec.bench.runners import run_benchmark
from specdec.bench.shared_prefix import run_shared_prefix, shared_prefix_to_markdown
from specdec.engine import Engine, EngineConfig
from specdec.engine.core import DEFAULT_DRAFT_VOCAB
from specdec.models.fetch import default_pair
from specdec.types import PRECISIONS, Method, SamplingParams

# --scenario NAME: the run and its Markdown report
SCENARIOS = {
    "shared-prefix": (run_shared_prefix, shared_prefix_to_markdown),
    "agent-loop": (run_agent_loop, agent_loop_to_markdown),
    "json-schema": (run_structured, structured_to_markdown),
    "methods": (run_methods, methods_to_markdown),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("models")
    m.add_argument("--target", help="target model: directory, .gguf or hub id (default: the default pair, fetched)")
    m.add_argument("--draft", help="draft model (default: the default pair's draft)")
    m.add_argument("--dtype", default="auto", choices=PRECISIONS,
                   help="target precision: auto (a .gguf file as stored on a CPU, else float32), gguf, int8, q4, float32, "
                        "bfloat16, float16")  # fmt: skip
    m.add_argument("--draft-dtype", default="auto", choices=PRECISIONS,
                   help="draft precision: auto (a .gguf file as stored, a float model as int8 on a CPU; bfloat16 on a GPU), "
                        "or as --dtype")  # fmt: skip
    m.add_argument("--hf-draft-dtype", default=None,
                   help="dtype of the draft given to transformers' assisted generation (default: --dtype)")  # fmt: skip
    m.add_argument("--draft-vocab", type=int, default=None,
                   help="the draft scores only the N most frequent token ids (0: all; default: the engine's)")  # fmt: skip
    m.add_argument("--device", default="auto")
    m.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    s = parser.add_argument_group("speculation")
    s.add_argument("--method", "--drafter", dest="method", choices=["draft", "ngram", "suffix", "auto"], default="draft")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--gamma", type=int, default=None, help="fixed γ (default: adaptive)")
    g.add_argument("--gamma-max", type=int, default=None, help="adaptive γ up to this (default: the engine's, 8)")
    p = parser.add_argument_group("sampling")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="base seed; prompt i uses seed + i")
    b = parser.add_argument_group("benchmark")
    b.add_argument("--prompts-file", help="one prompt per line, or JSON lines with a 'prompt' field")
    b.add_argument("--max-new-tokens", type=int, default=64)
    b.add_argument("--warmup", type=int, default=1, help="leading prompts used as warm-up, reported separately")
    b.add_argument("--no-chat-template", dest="chat", action="store_false", help="send prompts raw")
    b.add_argument("--compare-hf", action="store_true", help="also run transformers' assisted generation (the peer)")
    b.add_argument("--compare-llamacpp", action="store_true",
                   help="also run llama.cpp's target-only decoding on the target's GGUF file, same prompts, tokens and "
                        "threads (needs llama-cpp-python: pip install 'specdec[llamacpp]')")  # fmt: skip
    b.add_argument("--hf-target-only", action="store_true", help="also run transformers' plain generate on the target")
    b.add_argument("--concurrency", type=_levels, default=[], metavar="N[,N...]",
                   help="run N streams at once for each N (e.g. 1,4,8): aggregate tokens/s, TTFT and inter-token "
                        "latency per level, baseline and speculative on the same prompts")  # fmt: skip
    b.add_argument("--requests-per-stream", type=int, default=2, help="with --concurrency: requests each stream runs (default 2)")
    b.add_argument("--scenario", choices=list(SCENARIOS), default=None,
                   help="shared-prefix: questions behind one long system prompt, TTFT and aggregate tok/s (streams: "
                        "the first --concurrency level, default 4) with the prefix cache on and off; agent-loop: a "
                        "replayed code-editing conversation, target-only, suffix drafting, the draft model and the "
                        "hybrid; json-schema: ten requests with a JSON schema as their response format, target-only, "
                        "the draft model with and without jump-forward, and the hybrid; methods: the prompts "
                        "(built-in or --prompts-file) under target-only, the draft model, suffix drafting and the "
                        "hybrid in one run")  # fmt: skip
    b.add_argument("--prefix-cache-bytes", type=int, default=None,
                   help="the engine's prefix cache budget (default: serve's; the usual runs pause it so that every "
                        "method meets each prompt cold)")  # fmt: skip
    b.add_argument("--json", dest="json_path", help="write the report as JSON")
    b.add_argument("--plot", dest="plot_path", help="write a PNG chart")
    b.add_argument("--markdown", dest="markdown_path", help="write the Markdown report to a file (default: stdout)")


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not levels or any(n < 1 for n in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return levels


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    prompts = read_prompts(args.prompts_file) if args.prompts_file else builtin_prompts()
    return BenchOptions(
        prompts=prompts,
        warmup=args.warmup,
        max_new_tokens=args.max_new_tokens,
        method=Method(args.method),
        gamma=args.gamma,
        gamma_max=args.gamma_max,
        sampling=SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                seed=args.seed),  # fmt: skip
        compare_hf=args.compare_hf,
        compare_llamacpp=args.compare_llamacpp,
        hf_target_only=args.hf_target_only,
        hf_draft_dtype=args.hf_draft_dtype,
        chat=args.chat,
        concurrency=args.concurrency,
        requests_per_stream=args.requests_per_stream,
    )


def run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = options_from_args(args)
    options.validate()
    if options.concurrency and (options.compare_hf or options.hf_target_only or options.compare_llamacpp or args.plot_path):
        print("specdec bench: --concurrency runs baseline and speculative only (no --compare-hf, --hf-target-only, "
              "--compare-llamacpp, --plot)",
              file=sys.stderr)  # fmt: skip
        return 2
    target, draft = args.target, args.draft
    if target is None:
        target, default_draft = default_pair()
        draft = draft or default_draft
    if options.method in (Method.NGRAM, Method.SUFFIX) and args.scenario not in ("agent-loop", "methods"):
        draft = None
    elif draft is None:
        print("specdec bench: --method draft needs --draft when --target is given", file=sys.stderr)
        return 2
    if args.scenario and (options.compare_hf or options.hf_target_only or options.compare_llamacpp or args.plot_path):
        print("specdec bench: --scenario compares the prefix cache on and off only (no --compare-hf, --hf-target-only, "
              "--compare-llamacpp, --plot)", file=sys.stderr)  # fmt: skip
        return 2
    config = EngineConfig(method=options.method, gamma=options.gamma, gamma_max=options.gamma_max or 8,
                          draft_vocab=DEFAULT_DRAFT_VOCAB if args.draft_vocab is None else args.draft_vocab,
                          prefix_cache_bytes=args.prefix_cache_bytes)  # fmt: skip
    print(f"loading target {target} ({args.dtype})" + (f" and draft {draft} ({args.draft_dtype})" if draft else ""), file=sys.stderr)
    engine = Engine.load(target, draft, dtype=args.dtype, draft_dtype=args.draft_dtype, device=args.device,
                         threads=args.threads, config=config)  # fmt: skip
    bar = tqdm(total=1, unit="run", desc="bench", file=sys.stderr)

    def progress(event: dict) -> None:
        bar.total = event["total"]
        if event["event"] == "start":
            bar.set_postfix_str(event["message"])
        elif event["event"] == "done":
            bar.update(1)

    if args.scenario:
        run, to_md = SCENARIOS[args.scenario]
        report = run(engine, options, progress)
        md = to_md(report)
    else:
        with engine.prefix_cache.paused():  # every method runs each prompt cold
            report, md = _usual(engine, options, progress)
    bar.close()
    if args.markdown_path:
        Path(args.markdown_path).write_text(md, encoding="utf-8")
    else:
        print(md)
    if args.json_path:
        Path(args.json_path).write_text(to_json(report) + "\n", encoding="utf-8")
    if args.plot_path:
        plot(report, args.plot_path)
    return 0


def _usual(engine, options: BenchOptions, progress) -> tuple[dict, str]:
    if options.concurrency:
        report = run_concurrency(engine, options, progress)
        return report, concurrency_to_markdown(report)
    report = run_benchmark(engine, options, progress)
    return report, to_markdown(report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
