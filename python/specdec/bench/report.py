"""The report: pure arithmetic on the measurements (unit-tested with synthetic numbers), and its Markdown,
JSON and chart forms."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from specdec.engine.gamma import analytic_bound, expected_tokens


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(runs: list[dict]) -> dict:
    decode_tokens = sum(r["tokens"] - r["first_tokens"] for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    return {
        "decode_tokens_per_s": median([r["decode_tokens_per_s"] for r in runs]),
        "e2e_tokens_per_s": median([r["e2e_tokens_per_s"] for r in runs]),
        "ttft_s_median": median([r["ttft_s"] for r in runs]),
        "decode_tokens_per_s_pooled": decode_tokens / decode_s if decode_s > 0 else None,
        "tokens": sum(r["tokens"] for r in runs),
        "wall_s": sum(r["wall_s"] for r in runs),
    }


def _acceptance(runs: list[dict]) -> dict:
    proposed = sum(r["proposed"] for r in runs)
    accepted = sum(r["accepted"] for r in runs)
    tested = sum(r["tested"] for r in runs)
    steps = sum(r["verify_steps"] for r in runs)
    tokens = sum(r["tokens"] for r in runs)
    width = max((len(r["per_position_proposed"]) for r in runs), default=0)
    pp = [sum(r["per_position_proposed"][i] for r in runs if i < len(r["per_position_proposed"])) for i in range(width)]
    pa = [sum(r["per_position_accepted"][i] for r in runs if i < len(r["per_position_accepted"])) for i in range(width)]
    return {
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        # α of E(α, γ): a step stops at its first rejection, so only the drafts up to it were tested.
        "alpha": accepted / tested if tested else 0.0,
        # Tokens emitted per target verify step, bonus included (the engine's definition). With ignore_eos
        # and no stop strings nothing is truncated, so this is generated tokens ÷ verify steps.
        "mean_accepted_length": tokens / steps if steps else 0.0,
        "per_position_acceptance": [a / p if p else 0.0 for a, p in zip(pa, pp)],
        "proposed": proposed,
        "accepted": accepted,
        "verify_steps": steps,
        "mean_gamma": proposed / max(steps - len(runs), 1),  # drafts per decode step (the prefill drafts none)
        "draft_s_per_drafted_token": sum(r["draft_s"] for r in runs) / proposed if proposed else None,
    }


def bound_for(alpha: float, c: float | None, gamma: int | None, gamma_max: int) -> tuple[float | None, int | None]:
    """The analytic bound E(α,γ)/(γc+1): at the fixed γ, or for an adaptive policy at the best γ ≤ γ_max."""
    if c is None:
        return None, None
    if gamma is not None:
        return analytic_bound(alpha, gamma, c), gamma
    best = max(range(gamma_max + 1), key=lambda g: analytic_bound(alpha, g, c))
    return analytic_bound(alpha, best, c), best


def make_report(config: dict, results: list[dict], *, greedy: bool) -> dict:
    """Summaries, ratios and bound from per-prompt measurements (``results``: one entry per prompt)."""
    measured = [e for e in results if e["phase"] == "measure"]
    gamma, gamma_max = config.get("gamma"), config["gamma_max"]
    has_hf = bool(measured) and "hf_assisted" in measured[0]

    per_prompt = []
    for e in results:
        row = {k: e[k] for k in ("index", "phase", "category", "prompt", "prompt_tokens", "order")}
        for name in ("baseline", "speculative", "hf_assisted", "hf_target_only", "llamacpp"):
            if name in e:
                row[name] = dict(e[name])
        spec, base = e["speculative"], e["baseline"]
        row["speculative"].update(_acceptance([spec]))
        row["speedup"] = ratio(spec["decode_tokens_per_s"], base["decode_tokens_per_s"])
        row["speedup_e2e"] = ratio(spec["e2e_tokens_per_s"], base["e2e_tokens_per_s"])
        if "hf_assisted" in e:
            row["speedup_vs_hf"] = ratio(spec["decode_tokens_per_s"], e["hf_assisted"]["decode_tokens_per_s"])
        if "llamacpp" in e:
            row["speedup_vs_llamacpp"] = ratio(spec["decode_tokens_per_s"], e["llamacpp"]["decode_tokens_per_s"])
        row["c"] = spec["c"]
        row["analytic_bound"], row["bound_gamma"] = bound_for(row["speculative"]["alpha"], row["c"], gamma, gamma_max)
        row["efficiency"] = ratio(row["speedup"], row["analytic_bound"])
        # target_s holds verify forwards only; every request's first step is its prefill.
        row["verify_step_s"] = spec["target_s"] / (spec["verify_steps"] - 1) if spec["verify_steps"] > 1 else None
        row["target_decode_step_s"] = base["decode_s"] / (base["tokens"] - base["first_tokens"])
        if greedy:
            row["identical"] = spec["output_ids"] == base["output_ids"]
            if "hf_assisted" in e:
                row["hf_identical"] = e["hf_assisted"]["output_ids"] == base["output_ids"]
        per_prompt.append(row)

    base_runs = [e["baseline"] for e in measured]
    spec_runs = [e["speculative"] for e in measured]
    report: dict = {"config": config, "baseline": _summary(base_runs), "speculative": _summary(spec_runs)}
    report["speculative"].update(_acceptance(spec_runs))
    report["speculative"]["draft_s"] = sum(r["draft_s"] for r in spec_runs)
    report["speculative"]["target_s"] = sum(r["target_s"] for r in spec_runs)
    report["speculative"]["prefill_s"] = sum(r["prefill_s"] for r in spec_runs)
    report["speculative"]["kernel_s"] = sum(r["kernel_s"] for r in spec_runs)
    report["speculative"]["other_s"] = sum(r["other_s"] for r in spec_runs)
    has_hf_plain = bool(measured) and "hf_target_only" in measured[0]
    if has_hf:
        report["hf_assisted"] = _summary([e["hf_assisted"] for e in measured])
    if has_hf_plain:
        report["hf_target_only"] = _summary([e["hf_target_only"] for e in measured])
    if measured and "llamacpp" in measured[0]:
        report["llamacpp"] = _summary([e["llamacpp"] for e in measured])
        peer = report["llamacpp"]["decode_tokens_per_s"]
        report["speedup_vs_llamacpp"] = ratio(report["speculative"]["decode_tokens_per_s"], peer)
        report["baseline_vs_llamacpp"] = ratio(report["baseline"]["decode_tokens_per_s"], peer)
        report["ttft_vs_llamacpp"] = ratio(report["baseline"]["ttft_s_median"], report["llamacpp"]["ttft_s_median"])
    report["speedup"] = ratio(report["speculative"]["decode_tokens_per_s"], report["baseline"]["decode_tokens_per_s"])
    report["speedup_e2e"] = ratio(report["speculative"]["e2e_tokens_per_s"], report["baseline"]["e2e_tokens_per_s"])
    report["speedup_per_prompt_median"] = median([r["speedup"] for r in per_prompt if r["phase"] == "measure"])
    if has_hf:
        report["speedup_vs_hf"] = ratio(report["speculative"]["decode_tokens_per_s"], report["hf_assisted"]["decode_tokens_per_s"])
        report["hf_assisted_speedup"] = ratio(report["hf_assisted"]["decode_tokens_per_s"], report["baseline"]["decode_tokens_per_s"])
    if has_hf_plain:
        report["baseline_vs_hf_target_only"] = ratio(
            report["baseline"]["decode_tokens_per_s"], report["hf_target_only"]["decode_tokens_per_s"]
        )
    report["c"] = median([r["c"] for r in spec_runs])
    alpha = report["speculative"]["alpha"]
    report["analytic_bound"], report["bound_gamma"] = bound_for(alpha, report["c"], gamma, gamma_max)
    report["expected_tokens_per_step"] = expected_tokens(alpha, report["bound_gamma"]) if report["bound_gamma"] is not None else None
    report["efficiency"] = ratio(report["speedup"], report["analytic_bound"])
    verify_steps = sum(r["verify_steps"] for r in spec_runs)
    decode_steps = verify_steps - len(spec_runs)  # each request's first step is its prefill, not a verify
    report["verify_step_s"] = report["speculative"]["target_s"] / decode_steps if decode_steps > 0 else None
    base_decode_tokens = sum(r["tokens"] - r["first_tokens"] for r in base_runs)
    report["target_decode_step_s"] = sum(r["decode_s"] for r in base_runs) / base_decode_tokens if base_decode_tokens else None
    if greedy:
        report["identical_outputs"] = all(r["identical"] for r in per_prompt if r["phase"] == "measure")
        if has_hf:
            report["hf_identical_outputs"] = all(r["hf_identical"] for r in per_prompt if r["phase"] == "measure")
    else:
        report["identical_outputs"] = None
    report["per_prompt"] = [r for r in per_prompt if r["phase"] == "measure"]
    report["warmup"] = [r for r in per_prompt if r["phase"] == "warmup"]
    return report


# ---- output -------------------------------------------------------------------------------------


def fmt(x, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:{spec}}{suffix}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def model_rows(c: dict) -> list[str]:
    """The configuration table's model rows, shared by both reports."""
    return [
        f"| target | `{c['target']}` ({c['target_dtype']}) |",
        f"| draft | `{c['draft']}` ({c['draft_dtype']}) |" if c["draft"] else f"| drafter | {c['drafter']} |",
        f"| drafter, γ policy | {c['drafter']}, {c['gamma_policy']} |",
    ]


def environment_rows(c: dict) -> list[str]:
    """The configuration table's machine and run rows (``run_environment``), shared by both reports."""
    return [
        f"| threads, device | {c['threads']}, {c['device']} |",
        f"| machine | {c['machine']}; torch {c['torch']}, transformers {c['transformers']} |",
        f"| CPU, kernel path | {c.get('cpu_model', 'unknown')}, {c.get('kernel_isa', 'unknown')} (this CPU runs "
        f"{', '.join(c.get('cpu_isa_paths', [])) or 'unknown'}) |",
        f"| specdec | {c.get('specdec_version', 'unknown')}, commit {c.get('specdec_commit') or 'unknown'} |",
        f"| run | {c['started_at']}, {c['duration_s']:.0f} s; load average (1/5/15 min) "
        f"{'/'.join(map(str, c['load_average_start']))} at start, {'/'.join(map(str, c['load_average_end']))} at end |",
    ]


def to_markdown(report: dict) -> str:
    c, b, s = report["config"], report["baseline"], report["speculative"]
    hf = report.get("hf_assisted")
    hft = report.get("hf_target_only")
    lcp = report.get("llamacpp")
    sampling = c["sampling"]
    samp = "greedy" if sampling["temperature"] == 0 else (
        f"temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p {sampling['top_p']}, "
        f"min-p {sampling['min_p']}, seed {sampling['seed']}"
    )  # fmt: skip
    L = ["# specdec benchmark", ""]
    L += ["## Configuration", "", "| | |", "|---|---|"]
    L += [
        *model_rows(c),
        f"| prompts | {c['prompts']} measured + {c['warmup_prompts']} warm-up (excluded), chat template: {c['chat_template']} |",
        f"| new tokens per prompt | {c['max_new_tokens']} (EOS ignored) |",
        f"| sampling | {samp} |",
        f"| order | {c['order']} |",
        *environment_rows(c),
    ]
    if c["compare_hf"]:
        L.append(f"| transformers peer | `generate(assistant_model=draft)`, draft in {c['hf_draft_dtype'] or 'prompt lookup'} |")
    L += ["", "## Summary (medians over the measured prompts)", ""]
    if lcp:
        openmp = "OpenMP build: its threads sleep when idle, as specdec's do (slower)" if c.get("llamacpp_openmp") else "own thread pool"
        L.append(f"| llama.cpp peer | llama-cpp-python {c.get('llamacpp_version', '?')} ({openmp}), target-only on the same GGUF file, same threads |")
    peers = [(name, x) for name, x in (("HF assisted", hf), ("HF target-only", hft), ("llama.cpp target-only", lcp)) if x]
    L += ["| | baseline (target only) | speculative |" + "".join(f" {name} |" for name, _ in peers),
          "|---|---|---|" + "---|" * len(peers)]  # fmt: skip

    def line(label, key, spec=".2f"):
        return f"| {label} | {fmt(b[key], spec)} | {fmt(s[key], spec)} |" + "".join(f" {fmt(x[key], spec)} |" for _, x in peers)

    L += [
        line("decode tokens/s", "decode_tokens_per_s"),
        line("end-to-end tokens/s", "e2e_tokens_per_s"),
        line("TTFT (s)", "ttft_s_median", ".3f"),
        line("decode tokens/s, pooled", "decode_tokens_per_s_pooled"),
    ]
    L += ["", "| measured | value |", "|---|---|"]
    L.append(f"| **speedup** (speculative ÷ baseline decode tokens/s) | **{fmt(report['speedup'], '.3f', '×')}** |")
    L.append(f"| speedup, end-to-end tokens/s | {fmt(report['speedup_e2e'], '.3f', '×')} |")
    L.append(f"| speedup, median of per-prompt ratios | {fmt(report['speedup_per_prompt_median'], '.3f', '×')} |")
    if hf:
        L.append(f"| **speedup vs HF assisted** (speculative ÷ HF assisted decode tokens/s) | **{fmt(report['speedup_vs_hf'], '.3f', '×')}** |")
        L.append(f"| HF assisted ÷ baseline | {fmt(report['hf_assisted_speedup'], '.3f', '×')} |")
    if lcp:
        L.append(f"| **speculative ÷ llama.cpp target-only** (decode tokens/s) | **{fmt(report['speedup_vs_llamacpp'], '.3f', '×')}** |")
        L.append(f"| **baseline ÷ llama.cpp target-only** (decode tokens/s) | **{fmt(report['baseline_vs_llamacpp'], '.3f', '×')}** |")
        L.append(f"| baseline TTFT ÷ llama.cpp TTFT | {fmt(report['ttft_vs_llamacpp'], '.3f', '×')} |")
    if hft:
        L.append(f"| baseline ÷ HF target-only (is the baseline fair?) | {fmt(report['baseline_vs_hf_target_only'], '.3f', '×')} |")
    L.append(f"| acceptance rate (accepted ÷ proposed) | {fmt(s['acceptance_rate'], '.3f')} ({s['accepted']}/{s['proposed']}) |")
    L.append(f"| α (accepted ÷ tested, the bound's) | {fmt(s['alpha'], '.3f')} |")
    L.append(f"| mean accepted length (tokens per verify step) | {fmt(s['mean_accepted_length'], '.2f')} |")
    L.append(f"| mean γ (drafts per decode step) | {fmt(s['mean_gamma'], '.2f')} |")
    L.append("| per-position acceptance | " + ", ".join(f"{x:.2f}" for x in s["per_position_acceptance"]) + " |")
    L.append(f"| c (draft forward ÷ one-token target forward, engine-measured, median over prompts) | {fmt(report['c'], '.3f')} |")
    L.append(f"| target verify step ÷ target decode step | {fmt(ratio(report['verify_step_s'], report['target_decode_step_s']), '.2f', '×')} |")
    if report["identical_outputs"] is not None:
        L.append(f"| greedy outputs identical to baseline | {report['identical_outputs']} |")
    if "hf_identical_outputs" in report:
        L.append(f"| HF assisted outputs identical to baseline | {report['hf_identical_outputs']} |")
    L += ["", "| bound (not a measurement) | value |", "|---|---|"]
    L.append(
        f"| analytic bound E(α,γ)/(γc+1) at γ={report['bound_gamma']} | {fmt(report['analytic_bound'], '.3f', '×')} |"
    )
    L.append(f"| efficiency = measured speedup ÷ bound | {fmt(report['efficiency'], '.2f')} |")
    L += ["", "## Per prompt", ""]
    hf_cols = " HF assisted tok/s | vs HF |" if hf else ""
    L.append(f"| # | category | prompt tokens | baseline tok/s | speculative tok/s |{hf_cols} speedup | α | accepted length | c | bound | TTFT base / spec (s) | identical |")
    L.append("|---|---|---|---|---|" + ("---|---|" if hf else "") + "---|---|---|---|---|---|---|")
    for r in report["per_prompt"] + report["warmup"]:
        sp = r["speculative"]
        hf_cell = f" {fmt(r['hf_assisted']['decode_tokens_per_s'])} | {fmt(r.get('speedup_vs_hf'), '.2f', '×')} |" if hf else ""
        label = f"{r['index']}" + (" (warm-up)" if r["phase"] == "warmup" else "")
        L.append(
            f"| {label} | {r['category']} | {r['prompt_tokens']} | {fmt(r['baseline']['decode_tokens_per_s'])} | "
            f"{fmt(sp['decode_tokens_per_s'])} |{hf_cell} {fmt(r['speedup'], '.2f', '×')} | {fmt(sp['acceptance_rate'], '.2f')} | "
            f"{fmt(sp['mean_accepted_length'], '.2f')} | {fmt(r['c'], '.2f')} | {fmt(r['analytic_bound'], '.2f', '×')} | "
            f"{fmt(r['baseline']['ttft_s'], '.2f')} / {fmt(sp['ttft_s'], '.2f')} | {r.get('identical', '–')} |"
        )
    L += ["", "The warm-up row is measured like the others and excluded from every summary.", ""]
    L += ["## Notes and trade-offs", ""]
    L += _notes(report)
    return "\n".join(L) + "\n"


def _notes(report: dict) -> list[str]:
    """Plain statements derived from this report's numbers."""
    b, s, mem = report["baseline"], report["speculative"], report.get("memory", {})
    notes = []
    sp = report["speedup"]
    if sp is not None:
        verdict = "faster" if sp > 1.0 else "slower"
        notes.append(f"- Speculative decoding was {sp:.2f}× the baseline's decode rate here ({verdict}), measured on the same prompts in one run.")
    if report.get("analytic_bound") is not None:
        notes.append(
            f"- The analytic bound {report['analytic_bound']:.2f}× assumes that verifying γ+1 tokens costs one decode step. "
            f"Measured, a verify step cost {fmt(ratio(report['verify_step_s'], report['target_decode_step_s']), '.2f')}× a "
            f"target decode step ({fmt(report['verify_step_s'], '.3f')} s vs {fmt(report['target_decode_step_s'], '.3f')} s)."
        )
    if b["ttft_s_median"] is not None and s["ttft_s_median"] is not None:
        notes.append(
            f"- TTFT: {s['ttft_s_median']:.3f} s speculative vs {b['ttft_s_median']:.3f} s baseline (median); the speculative "
            "first step prefills the target only, the draft catches up on its first proposal."
        )
    if mem:
        notes.append(
            f"- Memory: target weights {_gib(mem['target_weight_bytes'])}, draft weights {_gib(mem['draft_weight_bytes'])}"
            + (f", a separate {_gib(mem['hf_draft_weight_bytes'])} draft copy for transformers' assisted generation"
               if mem.get("hf_draft_weight_bytes") and not mem.get("hf_draft_shared_with_engine") else "")
            + f"; process peak RSS {_gib(mem['peak_rss_bytes'])}."
        )
    if report.get("identical_outputs") is False:
        bad = [str(r["index"]) for r in report["per_prompt"] if not r.get("identical")]
        notes.append(f"- **Greedy outputs differ from the baseline** on prompt(s) {', '.join(bad)}.")
    if s["per_position_acceptance"]:
        notes.append(
            f"- Acceptance by draft position: {s['per_position_acceptance'][0]:.2f} at the first draft, "
            f"{s['per_position_acceptance'][-1]:.2f} at position {len(s['per_position_acceptance'])}."
        )
    cats = {}
    for r in report["per_prompt"]:
        cats.setdefault(r["category"] or "-", []).append(r["speedup"])
    if len(cats) > 1:
        parts = [f"{k} {statistics.median(v):.2f}×" for k, v in cats.items() if all(x is not None for x in v)]
        notes.append("- Median speedup by category: " + ", ".join(parts) + ".")
    return notes


def plot(report: dict, path: str | Path) -> None:
    """Per-prompt decode tokens/s (baseline, speculative, and the peers run) and acceptance per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_prompt"]
    labels = [f"{r['index']}\n{r['category']}" for r in rows]
    series = [("baseline", "baseline"), ("speculative", "speculative")]
    if "hf_assisted" in report:
        series.append(("hf_assisted", "HF assisted"))
    if "llamacpp" in report:
        series.append(("llamacpp", "llama.cpp target-only"))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(rows)), 8), sharex=True)
    width = 0.8 / len(series)
    xs = range(len(rows))
    for k, (key, name) in enumerate(series):
        ax1.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], [r[key]["decode_tokens_per_s"] for r in rows],
                width, label=name)  # fmt: skip
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title(
        f"speedup {fmt(report['speedup'], '.2f')}× (measured), bound {fmt(report['analytic_bound'], '.2f')}×; "
        f"{report['config']['max_new_tokens']} tokens/prompt"
    )
    ax1.legend()
    ax2.bar(list(xs), [r["speculative"]["acceptance_rate"] for r in rows], 0.6, color="tab:green")
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("acceptance rate")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "value"):
        return x.value
    raise TypeError(f"not JSON serialisable: {type(x)}")


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2, default=_json_default, allow_nan=False)
