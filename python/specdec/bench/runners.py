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

import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import asdict

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from specdec.bench.environment import rss_bytes, run_environment, weight_bytes
from specdec.bench.llamacpp import LlamaCpp
from specdec.bench.options import BenchOptions
from specdec.bench.prompts import Prompt
from specdec.bench.report import make_report
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SamplingParams, SpeculationParams


def rates(n: int, ttft_s: float, wall_s: float, first_tokens: int = 1) -> dict:
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


def pooled_by_method(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method, its ``time_engine`` runs pooled: decode tokens/s (tokens after the first ÷ decode seconds), drafts
    proposed and accepted, and the ratio to target-only's rate (the method named "none")."""
    summary = {}
    for name, rs in runs.items():
        proposed, accepted = sum(r["proposed"] for r in rs), sum(r["accepted"] for r in rs)
        summary[name] = {"decode_tokens_per_s": sum(r["tokens"] - r["first_tokens"] for r in rs) / sum(r["decode_s"] for r in rs),
                         "proposed": proposed, "accepted": accepted,
                         "acceptance_rate": accepted / proposed if proposed else 0.0}  # fmt: skip
    base = summary["none"]["decode_tokens_per_s"]
    for s in summary.values():
        s["vs_target_only"] = s["decode_tokens_per_s"] / base
    return summary


class RunCounter:
    """A scenario's finished runs, each reported to ``progress`` as it ends."""

    def __init__(self, progress: Callable[[dict], None] | None, total: int) -> None:
        self.progress = progress or (lambda event: None)
        self.total, self.done = total, 0

    def add(self, label: str, run: dict) -> None:
        self.done += 1
        self.progress({"event": "done", "done": self.done, "total": self.total,
                       "message": f"{label}: {run['decode_tokens_per_s']:.2f} tok/s"})  # fmt: skip


def rotating_runs(engine, names: list[str], index: int, request_for: Callable[[str], GenerationRequest],
                  counter: RunCounter, label: str) -> dict:  # fmt: skip
    """Every method in ``names`` on one request (``request_for(name)``), in an order rotated by ``index``, so that no
    method always meets a request first. Returns {"order", "runs": {name: its ``time_engine`` run}, "identical":
    whether every output equals target-only's (the method named "none")}."""
    order = names[index % len(names):] + names[: index % len(names)]
    runs = {}
    for name in order:
        runs[name] = time_engine(engine, [request_for(name)])[0]
        counter.add(f"{label}, {name}", runs[name])
    reference = runs["none"]["output_ids"]
    return {"order": order, "runs": runs, "identical": all(r["output_ids"] == reference for r in runs.values())}


def scenario_report(scenario: str, config: dict, summary: dict, items: str, rows: list[dict]) -> dict:
    """A per-request scenario's report: its config and pooled summary, whether every row's outputs agreed across
    methods, and the rows themselves under ``items`` ("turns", "requests", "prompts")."""
    return {"scenario": scenario, "config": config, "summary": summary,
            "identical_outputs": all(row["identical"] for row in rows), items: rows}  # fmt: skip


def _no_check() -> None:
    pass


def time_engine(engine, requests: list[GenerationRequest], check: Callable[[], None] = _no_check) -> list[dict]:
    """Run requests to completion, stepped together; per request its tokens, timings and engine metrics.
    ``check`` runs before every step and may raise to stop the run (its caches are freed)."""
    t0 = time.perf_counter()
    seqs = [engine.start(r) for r in requests]
    first: dict[int, float] = {}
    first_tokens: dict[int, int] = {}
    end: dict[int, float] = {}
    try:
        live = list(seqs)
        while live:
            check()
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
        run = rates(len(s.output_ids), first[id(s)] - t0, end[id(s)] - t0, first_tokens[id(s)])
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
            grammar_s=m.grammar_s,
            forced=m.forced,
            cached_prompt_tokens=m.cached_prompt_tokens,
        )
        runs.append(run)
    return runs


def _speculative_run(engine, request: GenerationRequest, check: Callable[[], None]) -> dict:
    run = time_engine(engine, [request], check)[0]
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


class _Checked(StoppingCriteria):
    """Runs ``check`` at each of transformers' generation steps; it raises to stop the run."""

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        self.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def _time_hf(engine, prompt_ids: list[int], options: BenchOptions, assistant, seed: int,
             check: Callable[[], None]) -> dict:  # fmt: skip
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
    out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer,
                         stopping_criteria=StoppingCriteriaList([_Checked(check)]), **kwargs)  # fmt: skip
    wall = time.perf_counter() - t0
    new = [int(t) for t in out[0, len(prompt_ids) :]]
    if len(new) != options.max_new_tokens:
        raise RuntimeError(f"transformers generated {len(new)} tokens, expected {options.max_new_tokens}")
    run = rates(len(new), streamer.first_token_at - t0, wall, streamer.first_tokens)
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
    return load_model(engine.draft.name, dtype=dtype, device=str(engine.target.device)).model, dtype


def _time_llamacpp(peer: LlamaCpp, prompt_ids: list[int], options: BenchOptions, seed: int, check) -> dict:
    ids, ttft, wall = peer.run(prompt_ids, options.max_new_tokens, options.sampling, seed, check)
    run = rates(len(ids), ttft, wall)
    run["output_ids"] = ids
    return run


def encode_prompt(engine, prompt: Prompt, chat: bool, max_tokens: int | None = None, name: str = "prompt") -> list[int]:
    """The prompt's ids, in the target's chat template when asked and it has one; at most ``max_tokens``."""
    if chat and getattr(engine.tokenizer, "chat_template", None):
        return engine.tokenize("messages", [{"role": "user", "content": prompt.text}], max_tokens, name)
    return engine.tokenize("text", prompt.text, max_tokens, name)


def run_benchmark(
    engine,
    options: BenchOptions,
    progress: Callable[[dict], None] | None = None,
    check: Callable[[], None] = _no_check,
) -> dict:
    """Measure baseline, speculative (and transformers) on every prompt; return the report dict. ``check`` runs
    before every engine step (and transformers' steps) and may raise to stop the benchmark."""
    options.validate()
    progress = progress or (lambda event: None)
    assistant, hf_draft_dtype = _hf_assistant(engine, options) if options.compare_hf else (None, "")
    peer = LlamaCpp(engine.target.name, threads=torch.get_num_threads(), context=engine.context_length) if options.compare_llamacpp else None
    methods = ["baseline", "speculative"] + (["hf_assisted"] if options.compare_hf else [])
    methods += ["hf_target_only"] if options.hf_target_only else []
    methods += ["llamacpp"] if peer else []
    total = len(options.prompts) * len(methods)
    done = 0
    greedy = options.sampling.greedy
    base_seed = options.sampling.seed if options.sampling.seed is not None else 1234
    rss_start = rss_bytes()
    load_start = os.getloadavg()
    t_start = time.time()
    results = []
    for i, prompt in enumerate(options.prompts):
        prompt_ids = encode_prompt(engine, prompt, options.chat, options.max_prompt_tokens, f"prompts[{i}]")
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
            "baseline": lambda: time_engine(engine, [request(Method.NONE, gamma=0)], check)[0],
            "speculative": lambda: _speculative_run(engine, request(options.method, options.gamma, options.gamma_max),
                                                    check),  # fmt: skip
            "hf_assisted": lambda: _time_hf(engine, prompt_ids, options, assistant, seed, check),
            "hf_target_only": lambda: _time_hf(engine, prompt_ids, options, None, seed, check),
            "llamacpp": lambda: _time_llamacpp(peer, prompt_ids, options, seed, check),
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
        "compare_llamacpp": options.compare_llamacpp,
        "llamacpp_version": peer.version if peer else "",
        "llamacpp_openmp": peer.openmp if peer else None,
        "llamacpp_system_info": peer.system_info if peer else "",
        "order": "interleaved, rotating per prompt",
        **run_environment(t_start, load_start),
    }
    memory = {
        "rss_bytes_before": rss_start,
        "rss_bytes_after": rss_bytes(),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "target_weight_bytes": weight_bytes(engine.target.model),
        "draft_weight_bytes": weight_bytes(engine.draft.model) if engine.draft is not None else 0,
        "hf_draft_weight_bytes": weight_bytes(assistant) if isinstance(assistant, torch.nn.Module) else 0,
        "hf_draft_shared_with_engine": engine.draft is not None and assistant is getattr(engine.draft, "model", None),
    }
    report = make_report(config, results, greedy=greedy)
    report["memory"] = memory
    report["engine_cost_ratio"] = engine.cost_ratio()
    progress({"event": "finished", "done": total, "total": total, "message": "benchmark finished"})
    return report
