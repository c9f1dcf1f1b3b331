"""The benchmark harness, shared by ``specdec bench`` and the Benchmark RPC: target-only vs speculative (vs
transformers' assisted generation) on the same prompts, all measured.

``run_benchmark(engine, options, progress, check)`` is the one call both use; ``run_concurrency`` measures N streams at
once; ``run_shared_prefix`` the prefix cache on and off behind one system prompt; ``run_agent_loop`` the drafters on a
replayed code-editing conversation; ``run_structured`` structured output (JSON schemas) under each method;
``run_methods`` every method on the same prompts in one run. The report is a dict
(``to_json``, ``to_markdown``, ``plot``).
"""

from specdec.bench.agent_loop import agent_loop_to_markdown, run_agent_loop
from specdec.bench.cli import add_arguments, options_from_args, run_cli
from specdec.bench.concurrency import concurrency_to_markdown, make_concurrency_report, run_concurrency
from specdec.bench.methods import methods_to_markdown, run_methods
from specdec.bench.options import BenchOptions
from specdec.bench.prompts import Prompt, builtin_prompts, read_prompts
from specdec.bench.report import bound_for, make_report, plot, to_json, to_markdown
from specdec.bench.runners import run_benchmark
from specdec.bench.shared_prefix import run_shared_prefix, shared_prefix_to_markdown
from specdec.bench.structured import run_structured, structured_to_markdown

__all__ = [
    "BenchOptions",
    "Prompt",
    "add_arguments",
    "agent_loop_to_markdown",
    "bound_for",
    "builtin_prompts",
    "concurrency_to_markdown",
    "make_concurrency_report",
    "make_report",
    "methods_to_markdown",
    "options_from_args",
    "plot",
    "read_prompts",
    "run_benchmark",
    "run_cli",
    "run_agent_loop",
    "run_concurrency",
    "run_methods",
    "run_shared_prefix",
    "run_structured",
    "shared_prefix_to_markdown",
    "structured_to_markdown",
    "to_json",
    "to_markdown",
]
