"""N streams at once: aggregate tokens/s, TTFT and inter-token latency, baseline and speculative on the same
prompts (``specdec bench --concurrency``)."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from specdec.bench.environment import rss_bytes, run_environment
from specdec.bench.options import BenchOptions
from specdec.bench.report import environment_rows, fmt, model_rows, ratio
from specdec.bench.runners import encode_prompt
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams


def percentiles(xs: list[float]) -> dict:
    """p50 and p99 (linear interpolation between order statistics); None without samples."""
    if not xs:
        return {"p50": None, "p99": None}
    p50, p99 = (float(v) for v in np.percentile(np.asarray(xs, dtype=np.float64), [50, 99]))
    return {"p50": p50, "p99": p99}


def _time_streams(engine, streams: list[list[GenerationRequest]]) -> dict:
    """All streams at once, each running its requests one after another: a request joins the batch at the step
    after its predecessor finished, as the scheduler admits them. Per request: TTFT from its submission to its
    first token; inter-token latency per token, the gap since the request's previous emitting step ÷ the tokens
    that step emitted (as the server's histogram). Aggregate tokens/s = all tokens ÷ wall time to the last token."""
    t0 = time.perf_counter()
    queues = [list(s) for s in streams]
    live: list[tuple] = []  # (sequence, record)
    records: list[dict] = []
    seqs = []
    steps = rows = 0

    def submit(k: int, now: float) -> None:
        request = queues[k].pop(0)
        seq = engine.start(request)
        seqs.append(seq)
        rec = {"stream": k, "request_id": request.request_id, "submitted": now, "first": None, "last": None,
               "end": None, "tokens": 0, "itl": []}  # fmt: skip
        records.append(rec)
        live.append((seq, rec))

    try:
        for k in range(len(streams)):
            submit(k, t0)
        while live:
            outs = engine.step_batch([seq for seq, _ in live])
            now = time.perf_counter()
            steps, rows = steps + 1, rows + len(live)
            ended = []
            for (seq, rec), out in zip(live, outs):
                n = len(out.token_ids)
                if n:
                    if rec["first"] is None:
                        rec["first"] = now
                    else:
                        rec["itl"].extend([(now - rec["last"]) / n] * n)
                    rec["last"] = now
                    rec["tokens"] += n
                if out.finished:
                    rec["end"] = now
                    rec["output_ids"] = list(seq.output_ids)
                    m = seq.metrics
                    rec.update(proposed=m.proposed, accepted=m.accepted, verify_steps=m.verify_steps)
                    ended.append(rec["stream"])
            live = [(seq, rec) for seq, rec in live if rec["end"] is None]
            for k in ended:
                if queues[k]:
                    submit(k, now)
    finally:
        for seq in seqs:
            engine.release(seq)
    wall = max(r["end"] for r in records) - t0
    tokens = sum(r["tokens"] for r in records)
    proposed, accepted = sum(r["proposed"] for r in records), sum(r["accepted"] for r in records)
    verify_steps = sum(r["verify_steps"] for r in records)
    return {
        "streams": len(streams),
        "requests": len(records),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_s": percentiles([r["first"] - r["submitted"] for r in records]),
        "itl_s": percentiles([x for r in records for x in r["itl"]]),
        "ttft_samples": len(records),
        "itl_samples": sum(len(r["itl"]) for r in records),
        "engine_steps": steps,
        "mean_batch": rows / steps,
        "proposed": proposed,
        "accepted": accepted,
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "verify_steps": verify_steps,
        "mean_gamma": proposed / max(verify_steps - len(records), 1),  # drafts per decode step (prefills draft none)
        "requests_detail": [
            {"stream": r["stream"], "request_id": r["request_id"], "tokens": r["tokens"], "ttft_s": r["first"] - r["submitted"],
             "e2e_s": r["end"] - r["submitted"], "output_ids": r["output_ids"]}
            for r in records
        ],  # fmt: skip
    }


def run_concurrency(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None) -> dict:
    """For each concurrency N: N streams at once, baseline (target only) and speculative on the same prompts."""
    options.validate()
    if not options.concurrency:
        raise ValueError("run_concurrency needs at least one concurrency level")
    progress = progress or (lambda event: None)
    prompts = [encode_prompt(engine, p, options.chat, options.max_prompt_tokens, f"prompts[{i}]")
               for i, p in enumerate(options.prompts) if i >= options.warmup]  # fmt: skip
    base_seed = options.sampling.seed if options.sampling.seed is not None else 1234
    methods = {"baseline": SpeculationParams(method=Method.NONE, gamma=0),
               "speculative": SpeculationParams(options.method, options.gamma, options.gamma_max)}  # fmt: skip

    def streams(n: int, method: str, per_stream: int, max_new_tokens: int) -> list[list[GenerationRequest]]:
        # Stream k takes the prompts in turn from prompt k; the same (stream, j) gets the same prompt and seed in
        # both methods, so greedy outputs must match request for request.
        return [[GenerationRequest(
                    prompt_ids=prompts[(k + j) % len(prompts)],
                    max_new_tokens=max_new_tokens,
                    ignore_eos=True,
                    sampling=SamplingParams(**{**asdict(options.sampling), "seed": base_seed + k * per_stream + j}),
                    speculation=methods[method],
                    request_id=f"c{n}-s{k}-r{j}",
                 ) for j in range(per_stream)] for k in range(n)]  # fmt: skip

    rss_start, load_start, t_start = rss_bytes(), os.getloadavg(), time.time()
    total = 2 * (len(options.concurrency) + 1)
    done = 0
    # Warm-up: one short round of each method at the highest concurrency (the batched paths), excluded.
    warm_n, warm_tokens = max(options.concurrency), max(2, options.max_new_tokens // 4)
    warmup = {}
    for name in methods:
        progress({"event": "start", "phase": "warmup", "method": name, "concurrency": warm_n, "done": done, "total": total,
                  "message": f"warm-up: {name} at concurrency {warm_n}"})  # fmt: skip
        warmup[name] = _time_streams(engine, streams(warm_n, name, 1, warm_tokens))["wall_s"]
        done += 1
        progress({"event": "done", "phase": "warmup", "done": done, "total": total, "message": f"warm-up {name} done"})
    levels = []
    for i, n in enumerate(options.concurrency):
        order = list(methods) if i % 2 == 0 else list(methods)[::-1]  # alternate: drift hits both alike
        level = {"concurrency": n, "order": order}
        for name in order:
            progress({"event": "start", "phase": "measure", "method": name, "concurrency": n, "done": done,
                      "total": total, "message": f"concurrency {n}: {name}"})  # fmt: skip
            level[name] = _time_streams(engine, streams(n, name, options.requests_per_stream, options.max_new_tokens))
            done += 1
            progress({"event": "done", "phase": "measure", "method": name, "concurrency": n, "done": done,
                      "total": total, "tokens_per_s": level[name]["tokens_per_s"],
                      "message": f"concurrency {n}: {name} {level[name]['tokens_per_s']:.2f} tok/s"})  # fmt: skip
        levels.append(level)
    info = engine.info()
    gamma = options.gamma if options.gamma is not None else (None if options.gamma_max else engine.config.gamma)
    gamma_max = options.gamma_max or engine.config.gamma_max
    config = {
        "target": info["target"],
        "draft": info["draft"] if options.method == Method.DRAFT else "",
        "target_dtype": info["target_dtype"],
        "draft_dtype": info["draft_dtype"] if options.method == Method.DRAFT else "",
        "device": info["device"],
        "drafter": options.method.value,
        "gamma_policy": f"fixed γ={gamma}" if gamma is not None else f"adaptive, γ ≤ {gamma_max}",
        "concurrency": list(options.concurrency),
        "requests_per_stream": options.requests_per_stream,
        "max_new_tokens": options.max_new_tokens,
        "prompts": len(prompts),
        "sampling": asdict(options.sampling),
        "chat_template": bool(options.chat and getattr(engine.tokenizer, "chat_template", None)),
        "warmup": {"concurrency": warm_n, "max_new_tokens": warm_tokens, "wall_s": warmup},
        "order": "baseline and speculative alternate first per concurrency level",
        **run_environment(t_start, load_start),
    }
    report = make_concurrency_report(config, levels, greedy=options.sampling.greedy)
    report["memory"] = {"rss_bytes_before": rss_start, "rss_bytes_after": rss_bytes(),
                        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # fmt: skip
    progress({"event": "finished", "done": total, "total": total, "message": "concurrency benchmark finished"})
    return report


def make_concurrency_report(config: dict, levels: list[dict], *, greedy: bool) -> dict:
    """Ratios from the measured levels: speculative ÷ baseline per level, aggregate(N) ÷ aggregate(1) per method."""
    one = next((lv for lv in levels if lv["concurrency"] == 1), None)
    rows = []
    for lv in levels:
        row = dict(lv)
        b, s = lv["baseline"], lv["speculative"]
        row["speedup"] = ratio(s["tokens_per_s"], b["tokens_per_s"])
        for name in ("baseline", "speculative"):
            row[f"{name}_scaling"] = ratio(lv[name]["tokens_per_s"], one[name]["tokens_per_s"]) if one else None
        if greedy:
            # By request: the two methods finish their requests in different orders.
            row["identical_outputs"] = _outputs_by_id(b) == _outputs_by_id(s)
        rows.append(row)
    return {"kind": "concurrency", "config": config, "levels": rows,
            "identical_outputs": all(r["identical_outputs"] for r in rows) if greedy else None}  # fmt: skip


def _outputs_by_id(run: dict) -> dict[str, list[int]]:
    return {r["request_id"]: r["output_ids"] for r in run["requests_detail"]}


def concurrency_to_markdown(report: dict) -> str:
    c = report["config"]
    sampling = c["sampling"]
    samp = "greedy" if sampling["temperature"] == 0 else f"temperature {sampling['temperature']}, seed {sampling['seed']}"
    L = ["# specdec concurrency benchmark", "", "## Configuration", "", "| | |", "|---|---|"]
    L += [
        *model_rows(c),
        f"| streams | {', '.join(map(str, c['concurrency']))} at once; each runs {c['requests_per_stream']} requests in turn |",
        f"| tokens per request | {c['max_new_tokens']} (EOS ignored); {c['prompts']} prompts, stream k starts at prompt k |",
        f"| sampling | {samp} |",
        f"| warm-up (excluded) | one round at concurrency {c['warmup']['concurrency']}, {c['warmup']['max_new_tokens']} tokens |",
        f"| order | {c['order']} |",
        *environment_rows(c),
    ]
    L += ["", "## Aggregate tokens/s (all streams' tokens ÷ wall time, measured)", ""]
    L += ["| concurrency | baseline tok/s | speculative tok/s | speculative ÷ baseline | baseline (N) ÷ (1) | speculative (N) ÷ (1) |"
          + (" greedy outputs identical |" if report["identical_outputs"] is not None else ""),
          "|---|---|---|---|---|---|" + ("---|" if report["identical_outputs"] is not None else "")]  # fmt: skip
    for r in report["levels"]:
        L.append(
            f"| {r['concurrency']} | {fmt(r['baseline']['tokens_per_s'])} | {fmt(r['speculative']['tokens_per_s'])} | "
            f"{fmt(r['speedup'], '.2f', '×')} | {fmt(r['baseline_scaling'], '.2f', '×')} | {fmt(r['speculative_scaling'], '.2f', '×')} |"
            + (f" {r['identical_outputs']} |" if report["identical_outputs"] is not None else "")
        )
    L += ["", "## Latency per request", ""]
    L += ["| concurrency | method | TTFT p50 (s) | TTFT p99 (s) | inter-token p50 (ms) | inter-token p99 (ms) | requests | tokens | wall (s) | mean batch | accepted ÷ proposed | mean γ |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in report["levels"]:
        for name in ("baseline", "speculative"):
            m = r[name]
            ms = {k: None if v is None else 1000 * v for k, v in m["itl_s"].items()}
            L.append(
                f"| {r['concurrency']} | {name} | {fmt(m['ttft_s']['p50'], '.3f')} | {fmt(m['ttft_s']['p99'], '.3f')} | "
                f"{fmt(ms['p50'], '.1f')} | {fmt(ms['p99'], '.1f')} | {m['requests']} | {m['tokens']} | {fmt(m['wall_s'], '.2f')} | "
                f"{fmt(m['mean_batch'], '.2f')} | {fmt(m['acceptance_rate'], '.2f') if name == 'speculative' else '–'} | "
                f"{fmt(m['mean_gamma'], '.2f') if name == 'speculative' else '–'} |"
            )
    L += ["", "TTFT runs from a request's submission (its stream's previous request finished) to its first token. "
          "Inter-token latency is per token: the gap between a request's emitting steps ÷ the tokens of that step. "
          "p99 over few samples is close to the maximum.", ""]  # fmt: skip
    return "\n".join(L) + "\n"
