"""Where a benchmark ran: the machine, the CPU and its instruction-set path, versions, load and memory."""

from __future__ import annotations

import itertools
import os
import platform
import time

import torch

from specdec.models import isa


def run_environment(t_start: float, load_start: tuple[float, float, float]) -> dict:
    return {
        "threads": torch.get_num_threads(),
        **host_info(),
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "specdec_version": package_version("specdec"),
        # Shipped code runs no git: a run from a checkout names its commit in the environment.
        "specdec_commit": os.environ.get("SPECDEC_COMMIT", ""),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
        "duration_s": time.time() - t_start,
        # Other work on the machine skews every method; the order is interleaved, but say how busy it was.
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


def host_info() -> dict:
    """The machine, its CPU model, the kernels' instruction-set path and the paths this CPU could take."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "cpu_model": cpu_model(),
        "kernel_isa": isa.ISA or "torch",
        "cpu_isa_paths": isa.supported(),
    }


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return 0


def weight_bytes(model) -> int:
    """Parameters and buffers (quantised layers keep their codes, scales and mins as buffers)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


def scenario_config(engine, max_new_tokens: int, t_start: float, load_start: tuple, **counts) -> dict:
    """A scenario report's config: the models, the token limit, what it counted (turns, requests), where and when."""
    info = engine.info()
    return {"target": info["target"], "draft": info["draft"], "max_new_tokens": max_new_tokens, **counts,
            **run_environment(t_start, load_start)}  # fmt: skip


def identical_footer(report: dict, items: str) -> list[str]:
    """A scenario report's closing lines: whether the methods' outputs agreed, and the prompt tokens of its
    ``items`` ("turns", "requests")."""
    return ["", f"Outputs identical across methods: {report['identical_outputs']}. Prompt tokens per "
            f"{items[:-1]}: {[x['prompt_tokens'] for x in report[items]]}."]  # fmt: skip


def scenario_heading(scenario: str, config: dict, what: str) -> list[str]:
    """A scenario report's first lines: its title with the models, then ``what`` it ran, and where and when."""
    models = config["target"] + (f" + {config['draft']}" if config["draft"] else "")
    return [
        f"# specdec bench --scenario {scenario}: {models}",
        "",
        f"{what}; host {config['cpu_model']} ({config['kernel_isa']}), {config['threads']} threads; commit "
        f"{config['specdec_commit'] or 'unknown'}; {config['started_at']}.",
    ]


def method_table(summary: dict) -> list[str]:
    """A scenario report's table of methods: decode tokens/s, its ratio to target-only and to the draft model (when
    the run had one), and the acceptance of drafted tokens."""
    draft = summary.get("draft")
    lines = ["| method | decode tok/s | ÷ target-only | ÷ draft model | acceptance |", "|---|---|---|---|---|"]
    for name, m in summary.items():
        vs_draft = f"{m['decode_tokens_per_s'] / draft['decode_tokens_per_s']:.2f}" if draft else "—"
        lines.append(f"| {name} | {m['decode_tokens_per_s']:.2f} | **{m['vs_target_only']:.2f}** | {vs_draft} | "
                     f"{m['acceptance_rate']:.2f} ({m['accepted']}/{m['proposed']}) |")  # fmt: skip
    return lines
