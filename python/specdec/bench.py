"""The honest benchmark: target-only vs speculative (vs transformers' assisted generation), all measured.

One process, one run, the same prompts and N for every method:

- every number is wall-clock, taken around the engine's own steps (or around ``generate`` for transformers);
- target-only decoding goes through the same engine with the ``none`` drafter, so the baseline pays the same
  per-step overheads as speculation;
- per prompt the methods run back to back in a rotating order (baseline, speculative, hf / speculative, hf,
  baseline / ...), so machine drift hits them alike;
- the first prompt(s) are a warm-up: measured and reported separately, never in the summary;
- summaries are medians over prompts; ``speedup`` is the ratio of the reported decode rates and nothing else.
  The analytic bound E(α,γ)/(γc+1) stands beside it, labelled as a bound, computed from the measured α and c;
  it is never used to produce a speedup.

Definitions (one prompt, N generated tokens, wall time W from the request's start to its last token, TTFT from
the start to the first emission, which holds F tokens: 1 for specdec, whose first step is the prefill, and
possibly more for transformers' assisted generation): decode tokens/s = (N − F) / (W − TTFT); end-to-end
tokens/s = N / W.
c = the engine's measured draft forward time ÷ one-token target forward time (its running estimates, read after
each prompt's speculative run; the summary takes the median over prompts); 0 for the n-gram drafter.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from specdec.params import GenerationRequest, Method, SamplingParams, SpeculationParams
from specdec.policy import analytic_bound, expected_tokens

# ---- prompts ------------------------------------------------------------------------------------


@dataclass
class Prompt:
    text: str
    category: str = ""


WARMUP_PROMPT = Prompt("Say hello and introduce yourself in two sentences.", "warm-up")

BUILTIN_PROMPTS: list[Prompt] = [
    Prompt("Write a Python function `is_prime(n)` that returns True when n is prime. Include a docstring.", "code"),
    Prompt("Implement binary search over a sorted Python list and state its time complexity.", "code"),
    Prompt(
        "Here is a function:\n\n```python\ndef mean(xs):\n    total = 0\n    for x in xs:\n        total += x\n"
        "    return total / len(xs)\n```\n\nRewrite it so that it returns None for an empty list. Keep "
        "everything else exactly the same and show the whole function.",
        "code edit",
    ),
    Prompt("What are three practical tips for sleeping better? Keep it short.", "chat"),
    Prompt("Explain to a beginner what a hash table is and why lookups are fast.", "chat"),
    Prompt(
        "Summarise the following paragraph in two sentences, quoting its most important phrase exactly:\n\n"
        "\"The lighthouse keeper kept a logbook for forty years. Every night he wrote down the weather, the "
        "ships that passed and the state of the lamp. When the lighthouse was automated, the logbook became "
        "the only record of how often the lamp had failed: eleven times, always in winter storms.\"",
        "summarise (quote)",
    ),
    Prompt(
        "Summarise this text in one sentence:\n\n\"Photosynthesis converts light energy into chemical energy. "
        "Plants take in carbon dioxide and water and, using sunlight, produce glucose and release oxygen. The "
        "process happens mainly in the chloroplasts of leaf cells.\"",
        "summarise",
    ),
    Prompt("A train travels 180 km in 2.5 hours. What is its average speed in km/h? Show your steps.", "math"),
    Prompt("Compute the derivative of f(x) = x^3 * sin(x). Show each step.", "math"),
    Prompt("Write a haiku about autumn rain.", "creative"),
]


def builtin_prompts() -> list[Prompt]:
    """The warm-up prompt followed by the 10 measured built-in prompts."""
    return [WARMUP_PROMPT, *BUILTIN_PROMPTS]


def read_prompts(path: str | Path) -> list[Prompt]:
    """One prompt per line, or JSON lines with a ``prompt`` field (and an optional ``category``)."""
    prompts = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON line: {e}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
                raise ValueError(f"{path}:{n}: a JSON line needs a non-empty string field 'prompt'")
            prompts.append(Prompt(obj["prompt"], str(obj.get("category", ""))))
        else:
            prompts.append(Prompt(line))
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---- options ------------------------------------------------------------------------------------


@dataclass
class BenchOptions:
    prompts: list[Prompt] = field(default_factory=builtin_prompts)
    warmup: int = 1  # leading prompts that only warm up (reported separately)
    max_new_tokens: int = 64
    method: Method = Method.DRAFT  # the drafter under test (the baseline is always 'none')
    gamma: int | None = None  # fixed γ; None = the engine's adaptive policy
    gamma_max: int | None = None  # None = the engine's
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compare_hf: bool = False  # also run transformers' assisted generation (the peer)
    hf_target_only: bool = False  # also run transformers' plain generate (is the engine's baseline a fair one?)
    hf_draft_dtype: str | None = None  # the draft as the user loaded it; None = the target's dtype
    chat: bool = True  # wrap prompts in the target's chat template when it has one
    # --concurrency: streams run at once (run_concurrency); each runs requests_per_stream requests in turn.
    concurrency: list[int] = field(default_factory=list)
    requests_per_stream: int = 2

    def validate(self) -> None:
        if not 0 <= self.warmup < len(self.prompts):
            raise ValueError(f"warmup must be in [0, {len(self.prompts)}) for {len(self.prompts)} prompts, got {self.warmup}")
        if self.max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be >= 2 (decode rate needs a second token), got {self.max_new_tokens}")
        if self.method == Method.NONE:
            raise ValueError("the drafter under test must be 'draft' or 'ngram' ('none' is the baseline)")
        SpeculationParams(self.method, self.gamma, self.gamma_max).validate()
        self.sampling.validate()
        if any(n < 1 for n in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests_per_stream < 1:
            raise ValueError(f"requests_per_stream must be >= 1, got {self.requests_per_stream}")


# ---- measuring ----------------------------------------------------------------------------------


def _rates(n: int, ttft_s: float, wall_s: float, first_tokens: int = 1) -> dict:
    """Rates of one request: ``first_tokens`` arrived together at ``ttft_s``, the rest by ``wall_s``."""
    decode_s = wall_s - ttft_s
    decode_tokens = n - first_tokens
    return {
        "tokens": n,
        "first_tokens": first_tokens,
        "ttft_s": ttft_s,
        "wall_s": wall_s,
        "decode_s": decode_s,
        "decode_tokens_per_s": decode_tokens / decode_s if decode_s > 0 and decode_tokens > 0 else math.nan,
        "e2e_tokens_per_s": n / wall_s,
    }


def _time_engine(engine, requests: list[GenerationRequest]) -> list[dict]:
    """Run requests to completion, stepped together; per request its tokens, timings and engine metrics."""
    t0 = time.perf_counter()
    seqs = [engine.start(r) for r in requests]
    first: dict[int, float] = {}
    first_tokens: dict[int, int] = {}
    end: dict[int, float] = {}
    try:
        live = list(seqs)
        while live:
            outs = engine.step_batch(live)
            now = time.perf_counter()
            for s, o in zip(live, outs):
                if o.token_ids and id(s) not in first:
                    first[id(s)], first_tokens[id(s)] = now, len(o.token_ids)
                if o.finished:
                    end[id(s)] = now
            live = [s for s in live if not s.finished]
    finally:
        for s in seqs:
            engine.release(s)
    runs = []
    for s in seqs:
        m = s.metrics
        run = _rates(len(s.output_ids), first[id(s)] - t0, end[id(s)] - t0, first_tokens[id(s)])
        run.update(
            output_ids=list(s.output_ids),
            text=s.text,
            proposed=m.proposed,
            accepted=m.accepted,
            tested=m.tested,
            verify_steps=m.verify_steps,
            per_position_proposed=list(m.per_position_proposed),
            per_position_accepted=list(m.per_position_accepted),
            draft_s=m.draft_s,
            target_s=m.target_s,
            prefill_s=m.prefill_s,
            kernel_s=m.kernel_s,
            other_s=m.other_s,
        )
        runs.append(run)
    return runs


def _speculative_run(engine, request: GenerationRequest) -> dict:
    run = _time_engine(engine, [request])[0]
    # c as the engine measures it (draft forward ÷ one-token target forward, running estimates), after this run.
    run["c"] = 0.0 if request.speculation.method == Method.NGRAM else engine.cost_ratio()
    return run


class _TimingStreamer:
    """transformers streamer that records when the first generated token arrives (the first put is the prompt)."""

    def __init__(self) -> None:
        self.puts = 0
        self.first_token_at: float | None = None
        self.first_tokens = 0  # assisted generation can emit several tokens in its first step

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first_token_at = time.perf_counter()
            self.first_tokens = int(value.numel())

    def end(self) -> None:
        pass


def _hf_generation_kwargs(engine, options: BenchOptions) -> dict:
    s = options.sampling
    config = engine.target.model.generation_config
    kwargs = dict(
        max_new_tokens=options.max_new_tokens,
        # No EOS: generation runs to N tokens without suppressing EOS in the logits (as ignore_eos does).
        eos_token_id=None,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else 0,
        do_sample=not s.greedy,
    )
    if options.method == Method.NGRAM:
        # transformers' prompt lookup needs an EOS id; keep it and forbid EOS before N tokens instead.
        kwargs.update(eos_token_id=config.eos_token_id, min_new_tokens=options.max_new_tokens)
    if s.greedy:
        kwargs.update(temperature=None, top_k=None, top_p=None)
    else:
        kwargs.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p, min_p=s.min_p or None)
    return kwargs


@torch.inference_mode()
def _time_hf(engine, prompt_ids: list[int], options: BenchOptions, assistant, seed: int) -> dict:
    """transformers' own ``generate`` on the engine's target: with ``assistant`` (assisted) or without."""
    model = engine.target.model
    ids = torch.tensor([prompt_ids], device=model.device)
    kwargs = _hf_generation_kwargs(engine, options)
    if assistant == "ngram":
        kwargs["prompt_lookup_num_tokens"] = options.gamma or options.gamma_max or engine.config.gamma_max
    elif assistant is not None:
        kwargs["assistant_model"] = assistant
    if kwargs["do_sample"]:
        torch.manual_seed(seed)
    streamer = _TimingStreamer()
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)
    wall = time.perf_counter() - t0
    new = [int(t) for t in out[0, len(prompt_ids) :]]
    if len(new) != options.max_new_tokens:
        raise RuntimeError(f"transformers generated {len(new)} tokens, expected {options.max_new_tokens}")
    run = _rates(len(new), streamer.first_token_at - t0, wall, streamer.first_tokens)
    run.update(output_ids=new, text=engine.tokenizer.decode(new, skip_special_tokens=False))
    return run


def _hf_assistant(engine, options: BenchOptions):
    """The draft as the user loaded it (by default in the target's dtype), for transformers' assisted generation."""
    if options.method == Method.NGRAM:
        return "ngram", ""
    if engine.draft is None:
        raise ValueError("--compare-hf with the draft drafter needs a draft model")
    dtype = options.hf_draft_dtype or engine.target.precision
    if engine.draft.precision == dtype:
        return engine.draft.model, dtype  # the engine's draft is already that: no second copy
    from specdec.models import load_model

    return load_model(engine.draft.name, dtype=dtype, device=str(engine.target.device)).model, dtype


def _encode(engine, prompt: Prompt, chat: bool) -> list[int]:
    if chat and getattr(engine.tokenizer, "chat_template", None):
        return engine.encode_chat([{"role": "user", "content": prompt.text}])
    return engine.encode(prompt.text)


def run_benchmark(engine, options: BenchOptions, progress: Callable[[dict], None] | None = None) -> dict:
    """Measure baseline, speculative (and transformers) on every prompt; return the report dict."""
    options.validate()
    progress = progress or (lambda event: None)
    assistant, hf_draft_dtype = _hf_assistant(engine, options) if options.compare_hf else (None, "")
    methods = ["baseline", "speculative"] + (["hf_assisted"] if options.compare_hf else [])
    methods += ["hf_target_only"] if options.hf_target_only else []
    total = len(options.prompts) * len(methods)
    done = 0
    greedy = options.sampling.greedy
    base_seed = options.sampling.seed if options.sampling.seed is not None else 1234
    rss_start = _rss_bytes()
    load_start = os.getloadavg()
    t_start = time.time()
    results = []
    for i, prompt in enumerate(options.prompts):
        prompt_ids = _encode(engine, prompt, options.chat)
        seed = base_seed + i
        phase = "warmup" if i < options.warmup else "measure"

        def request(method: Method, gamma=None, gamma_max=None) -> GenerationRequest:
            sampling = SamplingParams(**{**asdict(options.sampling), "seed": seed})
            return GenerationRequest(
                prompt_ids=prompt_ids,
                max_new_tokens=options.max_new_tokens,
                ignore_eos=True,
                sampling=sampling,
                speculation=SpeculationParams(method=method, gamma=gamma, gamma_max=gamma_max),
                request_id=f"bench-{i}",
            )

        runners = {
            "baseline": lambda: _time_engine(engine, [request(Method.NONE, gamma=0)])[0],
            "speculative": lambda: _speculative_run(engine, request(options.method, options.gamma, options.gamma_max)),
            "hf_assisted": lambda: _time_hf(engine, prompt_ids, options, assistant, seed),
            "hf_target_only": lambda: _time_hf(engine, prompt_ids, options, None, seed),
        }
        entry = {"index": i, "phase": phase, "category": prompt.category, "prompt": prompt.text,
                 "prompt_tokens": len(prompt_ids)}  # fmt: skip
        order = methods[i % len(methods) :] + methods[: i % len(methods)]  # rotate: drift hits all alike
        entry["order"] = order
        for name in order:
            progress({"event": "start", "phase": phase, "prompt": i, "prompts": len(options.prompts), "method": name,
                      "done": done, "total": total, "message": f"{phase} prompt {i + 1}/{len(options.prompts)}: {name}"})  # fmt: skip
            entry[name] = runners[name]()
            done += 1
            r = entry[name]
            progress({"event": "done", "phase": phase, "prompt": i, "prompts": len(options.prompts), "method": name,
                      "done": done, "total": total, "decode_tokens_per_s": r["decode_tokens_per_s"],
                      "message": f"{phase} prompt {i + 1}/{len(options.prompts)}: {name} "
                                 f"{r['decode_tokens_per_s']:.2f} tok/s"})  # fmt: skip
        results.append(entry)

    gamma_max = options.gamma_max or engine.config.gamma_max
    # What the engine does with these requests: a fixed γ asked for, else adaptive when asked (gamma_max) or when
    # the engine is adaptive, else the engine's fixed γ.
    gamma = options.gamma if options.gamma is not None else (None if options.gamma_max else engine.config.gamma)
    info = engine.info()
    config = {
        "target": info["target"],
        "draft": info["draft"] if options.method == Method.DRAFT else "",
        "target_dtype": info["target_dtype"],
        "draft_dtype": info["draft_dtype"] if options.method == Method.DRAFT else "",
        "hf_draft_dtype": hf_draft_dtype,
        "device": info["device"],
        "drafter": options.method.value,
        "gamma_policy": f"fixed γ={gamma}" if gamma is not None else f"adaptive, γ ≤ {gamma_max}",
        "gamma": gamma,
        "gamma_max": gamma_max,
        "max_new_tokens": options.max_new_tokens,
        "sampling": asdict(options.sampling),
        "prompts": len(options.prompts) - options.warmup,
        "warmup_prompts": options.warmup,
        "chat_template": bool(options.chat and getattr(engine.tokenizer, "chat_template", None)),
        "compare_hf": options.compare_hf,
        "order": "interleaved, rotating per prompt",
        **_run_environment(t_start, load_start),
    }
    memory = {
        "rss_bytes_before": rss_start,
        "rss_bytes_after": _rss_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "target_weight_bytes": _weight_bytes(engine.target.model),
        "draft_weight_bytes": _weight_bytes(engine.draft.model) if engine.draft is not None else 0,
        "hf_draft_weight_bytes": _weight_bytes(assistant) if isinstance(assistant, torch.nn.Module) else 0,
        "hf_draft_shared_with_engine": engine.draft is not None and assistant is getattr(engine.draft, "model", None),
    }
    report = make_report(config, results, greedy=greedy)
    report["memory"] = memory
    report["engine_cost_ratio"] = engine.cost_ratio()
    progress({"event": "finished", "done": total, "total": total, "message": "benchmark finished"})
    return report


# ---- concurrency: N streams at once ----------------------------------------------------------------


def _percentiles(xs: list[float]) -> dict:
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
        "ttft_s": _percentiles([r["first"] - r["submitted"] for r in records]),
        "itl_s": _percentiles([x for r in records for x in r["itl"]]),
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
    prompts = [_encode(engine, p, options.chat) for p in options.prompts[options.warmup :]]
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

    rss_start, load_start, t_start = _rss_bytes(), os.getloadavg(), time.time()
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
        **_run_environment(t_start, load_start),
    }
    report = make_concurrency_report(config, levels, greedy=options.sampling.greedy)
    report["memory"] = {"rss_bytes_before": rss_start, "rss_bytes_after": _rss_bytes(),
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
        row["speedup"] = _ratio(s["tokens_per_s"], b["tokens_per_s"])
        for name in ("baseline", "speculative"):
            row[f"{name}_scaling"] = _ratio(lv[name]["tokens_per_s"], one[name]["tokens_per_s"]) if one else None
        if greedy:
            # By request: the two methods finish their requests in different orders.
            row["identical_outputs"] = _outputs_by_id(b) == _outputs_by_id(s)
        rows.append(row)
    return {"kind": "concurrency", "config": config, "levels": rows,
            "identical_outputs": all(r["identical_outputs"] for r in rows) if greedy else None}  # fmt: skip


def _outputs_by_id(run: dict) -> dict[str, list[int]]:
    return {r["request_id"]: r["output_ids"] for r in run["requests_detail"]}


def _model_rows(c: dict) -> list[str]:
    """The configuration table's model rows, shared by both reports."""
    return [
        f"| target | `{c['target']}` ({c['target_dtype']}) |",
        f"| draft | `{c['draft']}` ({c['draft_dtype']}) |" if c["draft"] else f"| drafter | {c['drafter']} |",
        f"| drafter, γ policy | {c['drafter']}, {c['gamma_policy']} |",
    ]


def _environment_rows(c: dict) -> list[str]:
    """The configuration table's machine and run rows (``_run_environment``), shared by both reports."""
    return [
        f"| threads, device | {c['threads']}, {c['device']} |",
        f"| machine | {c['machine']}; torch {c['torch']}, transformers {c['transformers']} |",
        f"| specdec commit | {c.get('specdec_commit') or 'unknown'} |",
        f"| run | {c['started_at']}, {c['duration_s']:.0f} s; load average (1/5/15 min) "
        f"{'/'.join(map(str, c['load_average_start']))} at start, {'/'.join(map(str, c['load_average_end']))} at end |",
    ]


def concurrency_to_markdown(report: dict) -> str:
    c = report["config"]
    sampling = c["sampling"]
    samp = "greedy" if sampling["temperature"] == 0 else f"temperature {sampling['temperature']}, seed {sampling['seed']}"
    L = ["# specdec concurrency benchmark", "", "## Configuration", "", "| | |", "|---|---|"]
    L += [
        *_model_rows(c),
        f"| streams | {', '.join(map(str, c['concurrency']))} at once; each runs {c['requests_per_stream']} requests in turn |",
        f"| tokens per request | {c['max_new_tokens']} (EOS ignored); {c['prompts']} prompts, stream k starts at prompt k |",
        f"| sampling | {samp} |",
        f"| warm-up (excluded) | one round at concurrency {c['warmup']['concurrency']}, {c['warmup']['max_new_tokens']} tokens |",
        f"| order | {c['order']} |",
        *_environment_rows(c),
    ]
    L += ["", "## Aggregate tokens/s (all streams' tokens ÷ wall time, measured)", ""]
    L += ["| concurrency | baseline tok/s | speculative tok/s | speculative ÷ baseline | baseline (N) ÷ (1) | speculative (N) ÷ (1) |"
          + (" greedy outputs identical |" if report["identical_outputs"] is not None else ""),
          "|---|---|---|---|---|---|" + ("---|" if report["identical_outputs"] is not None else "")]  # fmt: skip
    for r in report["levels"]:
        L.append(
            f"| {r['concurrency']} | {_f(r['baseline']['tokens_per_s'])} | {_f(r['speculative']['tokens_per_s'])} | "
            f"{_f(r['speedup'], '.2f', '×')} | {_f(r['baseline_scaling'], '.2f', '×')} | {_f(r['speculative_scaling'], '.2f', '×')} |"
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
                f"| {r['concurrency']} | {name} | {_f(m['ttft_s']['p50'], '.3f')} | {_f(m['ttft_s']['p99'], '.3f')} | "
                f"{_f(ms['p50'], '.1f')} | {_f(ms['p99'], '.1f')} | {m['requests']} | {m['tokens']} | {_f(m['wall_s'], '.2f')} | "
                f"{_f(m['mean_batch'], '.2f')} | {_f(m['acceptance_rate'], '.2f') if name == 'speculative' else '–'} | "
                f"{_f(m['mean_gamma'], '.2f') if name == 'speculative' else '–'} |"
            )
    L += ["", "TTFT runs from a request's submission (its stream's previous request finished) to its first token. "
          "Inter-token latency is per token: the gap between a request's emitting steps ÷ the tokens of that step. "
          "p99 over few samples is close to the maximum.", ""]  # fmt: skip
    return "\n".join(L) + "\n"


def _run_environment(t_start: float, load_start: tuple[float, float, float]) -> dict:
    return {
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "specdec_commit": _git_commit(),
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t_start)),
        "duration_s": time.time() - t_start,
        # Other work on the machine skews every method; the order is interleaved, but say how busy it was.
        "load_average_start": [round(x, 2) for x in load_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
    }


# ---- the report (pure arithmetic on the measurements: unit-tested with synthetic numbers) --------


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _summary(runs: list[dict]) -> dict:
    decode_tokens = sum(r["tokens"] - r["first_tokens"] for r in runs)
    decode_s = sum(r["decode_s"] for r in runs)
    return {
        "decode_tokens_per_s": _median([r["decode_tokens_per_s"] for r in runs]),
        "e2e_tokens_per_s": _median([r["e2e_tokens_per_s"] for r in runs]),
        "ttft_s_median": _median([r["ttft_s"] for r in runs]),
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
        for name in ("baseline", "speculative", "hf_assisted", "hf_target_only"):
            if name in e:
                row[name] = dict(e[name])
        spec, base = e["speculative"], e["baseline"]
        row["speculative"].update(_acceptance([spec]))
        row["speedup"] = _ratio(spec["decode_tokens_per_s"], base["decode_tokens_per_s"])
        row["speedup_e2e"] = _ratio(spec["e2e_tokens_per_s"], base["e2e_tokens_per_s"])
        if "hf_assisted" in e:
            row["speedup_vs_hf"] = _ratio(spec["decode_tokens_per_s"], e["hf_assisted"]["decode_tokens_per_s"])
        row["c"] = spec["c"]
        row["analytic_bound"], row["bound_gamma"] = bound_for(row["speculative"]["alpha"], row["c"], gamma, gamma_max)
        row["efficiency"] = _ratio(row["speedup"], row["analytic_bound"])
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
    report["speedup"] = _ratio(report["speculative"]["decode_tokens_per_s"], report["baseline"]["decode_tokens_per_s"])
    report["speedup_e2e"] = _ratio(report["speculative"]["e2e_tokens_per_s"], report["baseline"]["e2e_tokens_per_s"])
    report["speedup_per_prompt_median"] = _median([r["speedup"] for r in per_prompt if r["phase"] == "measure"])
    if has_hf:
        report["speedup_vs_hf"] = _ratio(report["speculative"]["decode_tokens_per_s"], report["hf_assisted"]["decode_tokens_per_s"])
        report["hf_assisted_speedup"] = _ratio(report["hf_assisted"]["decode_tokens_per_s"], report["baseline"]["decode_tokens_per_s"])
    if has_hf_plain:
        report["baseline_vs_hf_target_only"] = _ratio(
            report["baseline"]["decode_tokens_per_s"], report["hf_target_only"]["decode_tokens_per_s"]
        )
    report["c"] = _median([r["c"] for r in spec_runs])
    alpha = report["speculative"]["alpha"]
    report["analytic_bound"], report["bound_gamma"] = bound_for(alpha, report["c"], gamma, gamma_max)
    report["expected_tokens_per_step"] = expected_tokens(alpha, report["bound_gamma"]) if report["bound_gamma"] is not None else None
    report["efficiency"] = _ratio(report["speedup"], report["analytic_bound"])
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


def _f(x, spec: str = ".2f", suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:{spec}}{suffix}"


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def to_markdown(report: dict) -> str:
    c, b, s = report["config"], report["baseline"], report["speculative"]
    hf = report.get("hf_assisted")
    hft = report.get("hf_target_only")
    sampling = c["sampling"]
    samp = "greedy" if sampling["temperature"] == 0 else (
        f"temperature {sampling['temperature']}, top-k {sampling['top_k']}, top-p {sampling['top_p']}, "
        f"min-p {sampling['min_p']}, seed {sampling['seed']}"
    )  # fmt: skip
    L = ["# specdec benchmark", ""]
    L += ["## Configuration", "", "| | |", "|---|---|"]
    L += [
        *_model_rows(c),
        f"| prompts | {c['prompts']} measured + {c['warmup_prompts']} warm-up (excluded), chat template: {c['chat_template']} |",
        f"| new tokens per prompt | {c['max_new_tokens']} (EOS ignored) |",
        f"| sampling | {samp} |",
        f"| order | {c['order']} |",
        *_environment_rows(c),
    ]
    if c["compare_hf"]:
        L.append(f"| transformers peer | `generate(assistant_model=draft)`, draft in {c['hf_draft_dtype'] or 'prompt lookup'} |")
    L += ["", "## Summary (medians over the measured prompts)", ""]
    peers = [(name, x) for name, x in (("HF assisted", hf), ("HF target-only", hft)) if x]
    L += ["| | baseline (target only) | speculative |" + "".join(f" {name} |" for name, _ in peers),
          "|---|---|---|" + "---|" * len(peers)]  # fmt: skip

    def line(label, key, spec=".2f"):
        return f"| {label} | {_f(b[key], spec)} | {_f(s[key], spec)} |" + "".join(f" {_f(x[key], spec)} |" for _, x in peers)

    L += [
        line("decode tokens/s", "decode_tokens_per_s"),
        line("end-to-end tokens/s", "e2e_tokens_per_s"),
        line("TTFT (s)", "ttft_s_median", ".3f"),
        line("decode tokens/s, pooled", "decode_tokens_per_s_pooled"),
    ]
    L += ["", "| measured | value |", "|---|---|"]
    L.append(f"| **speedup** (speculative ÷ baseline decode tokens/s) | **{_f(report['speedup'], '.3f', '×')}** |")
    L.append(f"| speedup, end-to-end tokens/s | {_f(report['speedup_e2e'], '.3f', '×')} |")
    L.append(f"| speedup, median of per-prompt ratios | {_f(report['speedup_per_prompt_median'], '.3f', '×')} |")
    if hf:
        L.append(f"| **speedup vs HF assisted** (speculative ÷ HF assisted decode tokens/s) | **{_f(report['speedup_vs_hf'], '.3f', '×')}** |")
        L.append(f"| HF assisted ÷ baseline | {_f(report['hf_assisted_speedup'], '.3f', '×')} |")
    if hft:
        L.append(f"| baseline ÷ HF target-only (is the baseline fair?) | {_f(report['baseline_vs_hf_target_only'], '.3f', '×')} |")
    L.append(f"| acceptance rate (accepted ÷ proposed) | {_f(s['acceptance_rate'], '.3f')} ({s['accepted']}/{s['proposed']}) |")
    L.append(f"| α (accepted ÷ tested, the bound's) | {_f(s['alpha'], '.3f')} |")
    L.append(f"| mean accepted length (tokens per verify step) | {_f(s['mean_accepted_length'], '.2f')} |")
    L.append(f"| mean γ (drafts per decode step) | {_f(s['mean_gamma'], '.2f')} |")
    L.append("| per-position acceptance | " + ", ".join(f"{x:.2f}" for x in s["per_position_acceptance"]) + " |")
    L.append(f"| c (draft forward ÷ one-token target forward, engine-measured, median over prompts) | {_f(report['c'], '.3f')} |")
    L.append(f"| target verify step ÷ target decode step | {_f(_ratio(report['verify_step_s'], report['target_decode_step_s']), '.2f', '×')} |")
    if report["identical_outputs"] is not None:
        L.append(f"| greedy outputs identical to baseline | {report['identical_outputs']} |")
    if "hf_identical_outputs" in report:
        L.append(f"| HF assisted outputs identical to baseline | {report['hf_identical_outputs']} |")
    L += ["", "| bound (not a measurement) | value |", "|---|---|"]
    L.append(
        f"| analytic bound E(α,γ)/(γc+1) at γ={report['bound_gamma']} | {_f(report['analytic_bound'], '.3f', '×')} |"
    )
    L.append(f"| efficiency = measured speedup ÷ bound | {_f(report['efficiency'], '.2f')} |")
    L += ["", "## Per prompt", ""]
    hf_cols = " HF assisted tok/s | vs HF |" if hf else ""
    L.append(f"| # | category | prompt tokens | baseline tok/s | speculative tok/s |{hf_cols} speedup | α | accepted length | c | bound | TTFT base / spec (s) | identical |")
    L.append("|---|---|---|---|---|" + ("---|---|" if hf else "") + "---|---|---|---|---|---|---|")
    for r in report["per_prompt"] + report["warmup"]:
        sp = r["speculative"]
        hf_cell = f" {_f(r['hf_assisted']['decode_tokens_per_s'])} | {_f(r.get('speedup_vs_hf'), '.2f', '×')} |" if hf else ""
        label = f"{r['index']}" + (" (warm-up)" if r["phase"] == "warmup" else "")
        L.append(
            f"| {label} | {r['category']} | {r['prompt_tokens']} | {_f(r['baseline']['decode_tokens_per_s'])} | "
            f"{_f(sp['decode_tokens_per_s'])} |{hf_cell} {_f(r['speedup'], '.2f', '×')} | {_f(sp['acceptance_rate'], '.2f')} | "
            f"{_f(sp['mean_accepted_length'], '.2f')} | {_f(r['c'], '.2f')} | {_f(r['analytic_bound'], '.2f', '×')} | "
            f"{_f(r['baseline']['ttft_s'], '.2f')} / {_f(sp['ttft_s'], '.2f')} | {r.get('identical', '–')} |"
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
            f"Measured, a verify step cost {_f(_ratio(report['verify_step_s'], report['target_decode_step_s']), '.2f')}× a "
            f"target decode step ({_f(report['verify_step_s'], '.3f')} s vs {_f(report['target_decode_step_s'], '.3f')} s)."
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
    """Per-prompt decode tokens/s (baseline, speculative, HF assisted) and acceptance per prompt."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["per_prompt"]
    labels = [f"{r['index']}\n{r['category']}" for r in rows]
    series = [("baseline", "baseline"), ("speculative", "speculative")]
    if "hf_assisted" in report:
        series.append(("hf_assisted", "HF assisted"))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 1.1 * len(rows)), 8), sharex=True)
    width = 0.8 / len(series)
    xs = range(len(rows))
    for k, (key, name) in enumerate(series):
        ax1.bar([x + (k - (len(series) - 1) / 2) * width for x in xs], [r[key]["decode_tokens_per_s"] for r in rows],
                width, label=name)  # fmt: skip
    ax1.set_ylabel("decode tokens/s")
    ax1.set_title(
        f"speedup {_f(report['speedup'], '.2f')}× (measured), bound {_f(report['analytic_bound'], '.2f')}×; "
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


def _rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except Exception:
        return 0


def _weight_bytes(model) -> int:
    """Parameters and buffers (an int8 draft keeps its quantised weights and scales as buffers)."""
    if not isinstance(model, torch.nn.Module):
        return 0
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))


def _git_commit() -> str:
    """The source tree's commit (with '+dirty' when python/ or csrc/ has uncommitted changes), or ''."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "python", "csrc"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


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


# ---- CLI ----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    m = parser.add_argument_group("models")
    m.add_argument("--target", help="target model: directory, .gguf or hub id (default: the default pair, fetched)")
    m.add_argument("--draft", help="draft model (default: the default pair's draft)")
    m.add_argument("--dtype", default="float32", help="target dtype (default float32)")
    m.add_argument("--draft-dtype", default="auto",
                   help="dtype specdec runs the draft in: auto (int8 weight-only on a CPU, bfloat16 on a GPU), "
                        "int8, bfloat16, float16 or float32")  # fmt: skip
    m.add_argument("--hf-draft-dtype", default=None,
                   help="dtype of the draft given to transformers' assisted generation (default: --dtype)")  # fmt: skip
    m.add_argument("--device", default="auto")
    m.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    s = parser.add_argument_group("speculation")
    s.add_argument("--method", "--drafter", dest="method", choices=["draft", "ngram"], default="draft")
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
    b.add_argument("--hf-target-only", action="store_true", help="also run transformers' plain generate on the target")
    b.add_argument("--concurrency", type=_levels, default=[], metavar="N[,N...]",
                   help="run N streams at once for each N (e.g. 1,4,8): aggregate tokens/s, TTFT and inter-token "
                        "latency per level, baseline and speculative on the same prompts")  # fmt: skip
    b.add_argument("--requests-per-stream", type=int, default=2, help="with --concurrency: requests each stream runs (default 2)")
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
        hf_target_only=args.hf_target_only,
        hf_draft_dtype=args.hf_draft_dtype,
        chat=args.chat,
        concurrency=args.concurrency,
        requests_per_stream=args.requests_per_stream,
    )


def run_cli(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from specdec.engine import Engine, EngineConfig

    options = options_from_args(args)
    options.validate()
    if options.concurrency and (options.compare_hf or options.hf_target_only or args.plot_path):
        print("specdec bench: --concurrency runs baseline and speculative only (no --compare-hf, --hf-target-only, --plot)",
              file=sys.stderr)  # fmt: skip
        return 2
    target, draft = args.target, args.draft
    if target is None:
        from specdec.fetch import default_pair

        target, default_draft = default_pair()
        draft = draft or default_draft
    if options.method == Method.NGRAM:
        draft = None
    elif draft is None:
        print("specdec bench: --method draft needs --draft when --target is given", file=sys.stderr)
        return 2
    config = EngineConfig(method=options.method, gamma=options.gamma, gamma_max=options.gamma_max or 8)
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

    if options.concurrency:
        report = run_concurrency(engine, options, progress)
        md = concurrency_to_markdown(report)
    else:
        report = run_benchmark(engine, options, progress)
        md = to_markdown(report)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="specdec bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
