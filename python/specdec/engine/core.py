"""The speculative step: propose γ drafts, verify them in one target forward, accept, emit, roll back.

One step of a sequence, top to bottom (``Engine._step``):
1. choose γ (fixed, or adaptive from the measured α and step costs);
2. the drafter proposes up to γ tokens (draft model on its own KV cache, or a lookup of earlier text);
3. one target forward over the tokens the target has not seen plus the drafts, LM head only at the
   γ+1 positions being verified;
4. the kernels' ``verify`` applies the exact acceptance rule and returns n accepted drafts plus one token;
5. both KV caches are cropped to the accepted prefix (the prefix is never re-prefilled);
6. the emitted tokens pass through stop tokens, EOS, max_new_tokens and stop strings.
The last emitted token is not yet in either cache: it is the first input of the next step.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch

from specdec.engine import grammar, prefix_cache
from specdec.engine.detokenizer import Detokenizer
from specdec.engine.drafters import (
    DraftModelDrafter,
    Drafter,
    HybridDrafter,
    NoDrafter,
    Proposal,
    SuffixDrafter,
)
from specdec.engine.gamma import AcceptanceEstimate, StepCosts, choose_gamma
from specdec.engine.prompts import PromptTokenizer
from specdec.engine.sequence import Sequence, StepOutput
from specdec.kernels import CpuBackend, KernelBackend, sampling
from specdec.models import decoder, isa, linear, ragged
from specdec.models.loading import (
    LoadedModel,
    check_pair,
    load_model,
    resolve_device,
    return_freed_memory,
    set_threads,
)
from specdec.types import FinishReason, GenerationRequest, Method, ParsedRequest, TopLogprobs, stack_filters

# Most prompt tokens packed into one prefill forward: the packed attention is one causal square masked to the
# blocks of its prompts, so its wasted work grows with the square of the pack.
PACK_TOKENS = 2048
# Draft forward ÷ target forward assumed for a seeded sampled request's γ, which must not depend on timing: about
# the c that `specdec bench` reports for the default pair on a CPU.
REPRODUCIBLE_COST_RATIO = 0.35
# The α at which "could speculation pay in this batch at all?" is asked: about the best a good draft reaches.
# When even this α gives γ = 0 (a compute-bound batch), γ = 0 is about cost and no probes are made.
GOOD_ALPHA = 0.9


# The draft vocabulary that `specdec bench --draft-vocab N` picks on the default pair: the fewest ids that keep the
# acceptance rate of the whole vocabulary while cutting the draft step (docs/benchmarks.md lists the sweep).
DEFAULT_DRAFT_VOCAB = 65536


@dataclass(frozen=True)
class EngineConfig:
    method: Method = Method.DRAFT
    gamma: int | None = None  # fixed γ; None = adaptive in 0..gamma_max
    gamma_max: int = 8
    # Few-row linears (decode, verify) through the batch-invariant C++ kernels, and both models through the lean
    # forward built on them (models/decoder.py) where it serves the model.
    small_m_linear: bool = True
    # A prompt longer than this is prefilled in chunks of this many tokens, one chunk per step, so that the requests
    # already running keep emitting between them instead of waiting for the whole prompt. 0: one forward.
    prefill_chunk: int = 256
    # The draft's LM head scores only this many of the most frequent token ids (0: all of them): exact, since the
    # target decides every token; a cheaper draft step against a lower acceptance rate (`specdec bench --draft-vocab`).
    draft_vocab: int = DEFAULT_DRAFT_VOCAB
    # Bytes of prompt keys and values kept for later requests with the same prefix (engine/prefix_cache.py), the
    # target's and the draft's together; None: prefix_cache.default_budget(); 0: off.
    prefix_cache_bytes: int | None = None
    # Where a response format allows one token only, verify it as a draft without drafting it (accepted with
    # certainty: the masked distribution is one-hot there). Not for target-only decoding, which stays one token a step.
    jump_forward: bool = True

    def __post_init__(self) -> None:
        if self.prefix_cache_bytes is not None and self.prefix_cache_bytes < 0:
            raise ValueError(f"prefix_cache_bytes must be >= 0 (0: off), got {self.prefix_cache_bytes}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: the whole vocabulary), got {self.draft_vocab}")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0 (0: the whole prompt in one forward), got {self.prefill_chunk}")


class Engine:
    def __init__(
        self,
        target: LoadedModel,
        draft: LoadedModel | None = None,
        config: EngineConfig = EngineConfig(),
        kernels: KernelBackend | None = None,
    ) -> None:
        if config.method == Method.DRAFT and draft is None:
            raise ValueError("method 'draft' needs a draft model; give one or choose method 'ngram' or 'none'")
        if draft is not None:
            check_pair(target, draft)
        self.target = target
        self.draft = draft
        self.config = config
        self.kernels = kernels or CpuBackend()
        if config.small_m_linear:
            for m in (target, draft):
                if m is not None and m.device.type == "cpu":
                    linear.install(m.model)
        lean = config.small_m_linear and decoder.supports(target.model)
        self._target_decoder = decoder.Decoder(target.model) if lean else None
        # Only the lean forward computes a position's bits the same whichever chunk computed it (decoder.RowPlan),
        # which a reused prefix needs: elsewhere the cache stays off.
        budget = prefix_cache.default_budget() if config.prefix_cache_bytes is None else config.prefix_cache_bytes
        self.prefix_cache = prefix_cache.PrefixCache(budget if lean else 0)
        self.tokenizer = target.tokenizer
        rows = [target.vocab_size] + ([draft.vocab_size] if draft is not None else [])
        self.vocab_size = min(rows)  # the ids both models can score
        self.real_vocab = min(self.vocab_size, len(self.tokenizer))  # ids past this are embedding padding
        self.context_length = target.context_length
        self.prompts = PromptTokenizer(self.tokenizer, target.name)
        self.eos_token_ids = self._eos_ids()
        self.grammars = grammar.GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_token_ids)
        # Verify tokens that cost about one decode step until measured (StepCosts): the rows the small-M kernel
        # holds in registers per weight row on a CPU with it, one on a CPU without it (torch runs a GEMV per row),
        # and a GPU's many more. Not the kernel's 32-row limit: rows past 8 add compute, so a flat guess up to 32
        # tempts a batch of 8 streams into drafting that does not pay (`specdec bench --concurrency 8`).
        cpu = target.device.type == "cpu"
        flat = linear.ROWS_PER_PASS if cpu and config.small_m_linear else 1 if cpu else 64
        self.costs = StepCosts(flat_tokens=flat)
        self._drafters: dict[Method, Drafter] = {
            Method.NONE: NoDrafter(),
            Method.NGRAM: SuffixDrafter(shared=False),  # prompt lookup: the request's own text
            Method.SUFFIX: (suffix := SuffixDrafter()),
            Method.AUTO: suffix,  # until a draft model joins it
        }
        if draft is not None:
            # The draft samples with the CPU kernels whatever verifies: its logits are on the host, and so must be the
            # q it hands to verify, which a device backend (tt) does not return.
            self._drafters[Method.DRAFT] = DraftModelDrafter(
                draft, self.vocab_size, self.costs, CpuBackend(), lean=config.small_m_linear,
                draft_vocab=config.draft_vocab, prefix_cache=self.prefix_cache,
            )  # fmt: skip
            self._drafters[Method.AUTO] = HybridDrafter(suffix, self._drafters[Method.DRAFT])
        # Per drafter, α over the recent verify steps of all requests (long memory: many steps per request).
        self._shared_alpha = {m: AcceptanceEstimate(decay=0.98) for m in self._drafters}
        return_freed_memory()  # the lean forwards' fused weights replaced the models' own

    @classmethod
    def load(
        cls,
        target: str,
        draft: str | None = None,
        *,
        dtype: str = "auto",
        draft_dtype: str = "auto",
        device: str = "auto",
        threads: int | None = None,
        config: EngineConfig = EngineConfig(),
        kernels: KernelBackend | None = None,
    ) -> Engine:
        set_threads(threads)
        if resolve_device(device).type == "cpu":  # which kernel path serves, or that none does (torch's GEMM)
            logging.getLogger("specdec.engine").log(logging.INFO if isa.ISA else logging.WARNING, isa.describe())
        t = load_model(target, dtype=dtype, device=device)
        d = load_model(draft, dtype=draft_dtype, device=device, draft=True) if draft else None
        if d is None and config.method == Method.DRAFT:
            config = replace(config, method=Method.NGRAM)
        return cls(t, d, config, kernels)

    def _eos_ids(self) -> frozenset[int]:
        ids = set()
        gen_eos = getattr(self.target.model.generation_config, "eos_token_id", None)
        for e in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if e is not None:
                ids.add(int(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return frozenset(ids)

    def info(self) -> dict:
        c = self.config
        return {
            "target": self.target.name,
            "draft": self.draft.name if self.draft else "",
            "target_dtype": self.target.precision,
            "draft_dtype": self.draft.precision if self.draft else "",
            "device": str(self.target.device),
            "vocab_size": self.real_vocab,  # ids a request may use
            "model_vocab_rows": self.vocab_size,  # output-embedding rows both models share (may include padding)
            "context_length": self.context_length,
            "method": c.method.value,
            "gamma_policy": "adaptive" if c.gamma is None else "fixed",
            "gamma": c.gamma if c.gamma is not None else 0,
            "gamma_max": c.gamma_max,
        }

    def cost_ratio(self) -> float | None:
        return self.costs.cost_ratio()

    # ---- requests -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.prompts.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.prompts.encode_chat(messages)

    def tokenize(self, kind: str, prompt: str | list[int] | list[dict[str, str]], max_tokens: int | None = None,
                 name: str = "prompt") -> list[int]:  # fmt: skip
        """``PromptTokenizer.tokenize`` on the engine's thread."""
        return self.prompts.tokenize(kind, prompt, max_tokens, name)

    def prepare(self, parsed: ParsedRequest) -> GenerationRequest:
        """Tokenize a parsed request's prompt and check it against its prompt-token limit; compile its response
        format (kept for ``start``)."""
        if (fmt := parsed.template.response_format) is not None:
            fmt.validate()
            self.grammars.compile(fmt)
        ids = self.tokenize(parsed.prompt_kind, parsed.prompt, parsed.max_prompt_tokens)
        return replace(parsed.template, prompt_ids=ids, sampling=replace(parsed.template.sampling),
                       speculation=replace(parsed.template.speculation), stop=list(parsed.template.stop),
                       stop_token_ids=list(parsed.template.stop_token_ids))  # fmt: skip

    def start(self, request: GenerationRequest) -> Sequence:
        """Validate a request and create its sequence; no model work happens until its first step."""
        request.validate(vocab_size=self.real_vocab, context_length=self.context_length)
        method = request.speculation.method or self.config.method
        if method not in self._drafters:
            raise ValueError(f"speculation.method {method.value!r} needs a draft model; this engine was loaded without one")
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        seq = Sequence(request, seed, method, Detokenizer(self.tokenizer, request.stop), self._shared_alpha[method])
        if request.response_format is not None:
            seq.constraint = self.grammars.compile(request.response_format).constraint(self.config.jump_forward)
        return seq

    def step_batch(self, seqs: list[Sequence]) -> list[StepOutput]:
        """One speculative step for each sequence. New sequences prefill first (short prompts together); the rest share forwards."""
        if any(s.finished for s in seqs):
            raise ValueError("step_batch got a finished sequence")
        now = time.perf_counter()
        for s in seqs:
            if s.metrics.first_step_at is None:
                s.metrics.first_step_at = now
        outs: dict[int, StepOutput] = {}
        running = [s for s in seqs if s.output_ids]
        fresh = [s for s in seqs if not s.output_ids]
        for s in fresh:
            if s.target_canonical is None:
                self._reuse_prefix(s)
        # New prompts that fit in a chunk prefill together, packed into one sequence (ragged.forward), up to
        # PACK_TOKENS a forward; the last part of a chunked prompt has a cache and prefills in a forward of its own.
        chunk = self.config.prefill_chunk
        whole = [s for s in fresh if s.target_len == 0 and not (chunk and len(s.all_ids) > chunk)]
        for pack in _packs(whole, PACK_TOKENS):
            outs.update(zip(map(id, pack), self._step(pack)))
        chunking = [s for s in fresh if chunk and len(s.all_ids) - s.target_len > chunk]
        for s in fresh:
            if s in chunking:  # one chunk per step, for the longest-waiting of the prompts longer than a chunk
                outs[id(s)] = self._prefill_chunk(s, chunk) if s is chunking[0] else StepOutput([], "", None)
            elif s not in whole:
                outs[id(s)] = self._step([s])[0]
        if running:
            outs.update(zip(map(id, running), self._step(running)))
        return [outs[id(s)] for s in seqs]

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Start a new sequence's target cache from the longest cached prefix of its prompt, short of the last token
        (whose logits the prefill step computes)."""
        cache, length = self.prefix_cache.load(prefix_cache.key("target", seq), seq.all_ids, len(seq.all_ids) - 1,
                                               count=True)  # fmt: skip
        if length:
            seq.target_cache, seq.target_len = cache, length
        seq.target_canonical = seq.metrics.cached_prompt_tokens = length

    def _keep_prefix(self, seq: Sequence, start: int, end: int) -> None:
        """Offer the prefix cache the blocks of a prefill forward over positions [start, end)."""
        seq.target_canonical = self.prefix_cache.extend(
            prefix_cache.key("target", seq), seq.all_ids, seq.target_cache, seq.target_canonical or 0, start, end)  # fmt: skip

    def finish(self, seq: Sequence, reason: FinishReason) -> StepOutput:
        """End a sequence early (cancel, deadline) and free its caches. Idempotent."""
        if not seq.finished:
            seq.finished, seq.finish_reason = True, reason
        self.release(seq)
        return StepOutput([], "", None, True, seq.finish_reason, seq.matched_stop)

    def recover(self, seq: Sequence) -> None:
        """After a step that raised: drop what it did to the caches, so the sequence can step again.

        Between steps both caches hold a prefix of ``all_ids`` short of its last token (the next step's first
        input). A failed step may have grown them with drafts, or advanced ``target_len`` before emitting;
        cropping back to that invariant makes the next step redo the work.
        """
        valid = len(seq.all_ids) - 1
        if seq.target_cache is not None and seq.target_len > 0:
            seq.target_len = min(seq.target_len, valid)
            seq.target_cache.crop(seq.target_len)
            seq.target_canonical = min(seq.target_canonical or 0, seq.target_len)
        self._drafter(seq).rollback(seq, valid)
        if seq.constraint is not None:
            seq.constraint.unwind()

    def release(self, seq: Sequence) -> None:
        seq.target_cache = None
        seq.target_len = 0
        self._drafter(seq).release(seq)

    def generate(self, request: GenerationRequest) -> Iterator[StepOutput]:
        seq = self.start(request)
        try:
            while not seq.finished:
                out = self.step_batch([seq])[0]
                if out.token_ids or out.finished:  # a prefill chunk's step emits nothing
                    yield out
        finally:
            self.release(seq)

    # ---- the step -------------------------------------------------------------------------------

    def _gammas(self, seqs: list[Sequence]) -> list[int]:
        """γ per sequence: fixed where asked; for a seeded sampled request, from its own α at a fixed cost ratio;
        else chosen from α and the measured costs of this batch size."""
        if not seqs[0].output_ids:
            return [0] * len(seqs)  # the prefill step emits one token, as fast as possible
        batch = len(seqs)
        runs_model = {id(s): self._drafter(s).runs_model_for(s) for s in seqs}
        model_rows = [s for s in seqs if runs_model[id(s)] and self._adaptive(s) and not s.reproducible]
        shared, could_pay = 0, True
        if model_rows:
            others = batch - len(model_rows)
            choose = partial(
                choose_gamma,
                draft_cost=self.costs.draft_cost(len(model_rows)),
                target_cost=lambda m: self.costs.target_cost(m + others, batch),
                gamma_max=self._gamma_max(model_rows[0]),
                catch_up=[self._catch_up(s) for s in model_rows],
            )
            shared = choose([s.alpha.alpha for s in model_rows])
            could_pay = shared > 0 or choose([GOOD_ALPHA] * len(model_rows)) > 0
        gammas = []
        for s in seqs:
            drafter = self._drafter(s)
            if not drafter.proposes:
                gamma = 0
            elif not self._adaptive(s):
                gamma = s.request.speculation.gamma if s.request.speculation.gamma is not None else self.config.gamma
            elif s.reproducible:  # the bound at a fixed cost ratio: its own α alone decides
                c = REPRODUCIBLE_COST_RATIO if runs_model[id(s)] else 0.0
                gamma = choose_gamma([s.alpha.alpha], c, lambda m: 1.0, self._gamma_max(s))
            elif runs_model[id(s)]:
                gamma = min(shared, self._gamma_max(s))
            else:
                target_cost = lambda m: self.costs.target_cost(m + batch - 1, batch)  # noqa: E731
                gamma = choose_gamma([s.alpha.alpha], 0.0, target_cost, self._gamma_max(s))
            if self._adaptive(s):
                gamma = s.probe.gamma(gamma, could_pay or s.reproducible or not runs_model[id(s)])
            gammas.append(max(0, min(gamma, self._most_drafts(s))))
        return gammas

    def _most_drafts(self, seq: Sequence) -> int:
        """Drafts a step of ``seq`` may verify: its emitted tokens stay within max_new_tokens and the context."""
        return min(seq.request.max_new_tokens - seq.metrics.completion_tokens - 1,
                   self.context_length - len(seq.all_ids) - 1)  # fmt: skip

    def _catch_up(self, seq: Sequence) -> tuple[float, int]:
        """(seconds, tokens left) of the draft forward over the tokens the draft has not seen, if it fell behind."""
        pending = self._drafter(seq).pending(seq)
        seconds = (self.costs.draft_cost(pending) or 0.0) if pending > 2 else 0.0  # 1-2 pending: a usual step
        return seconds, seq.request.max_new_tokens - seq.metrics.completion_tokens

    def _drafter(self, seq: Sequence) -> Drafter:
        return self._drafters[seq.method]

    def _adaptive(self, seq: Sequence) -> bool:
        spec = seq.request.speculation
        if spec.gamma is not None:
            return False
        return spec.gamma_max is not None or self.config.gamma is None

    def _gamma_max(self, seq: Sequence) -> int:
        return seq.request.speculation.gamma_max or self.config.gamma_max

    @torch.inference_mode()
    def _step(self, seqs: list[Sequence]) -> list[StepOutput]:
        t_step = time.perf_counter()
        prefill = not seqs[0].output_ids
        gammas = self._gammas(seqs)
        proposals = self._propose(seqs, gammas)
        self._constrain(seqs, proposals, jump_forward=not prefill)

        t0 = time.perf_counter()
        rows = []
        starts = [s.target_len for s in seqs]
        for s, p in zip(seqs, proposals):
            new = s.all_ids[s.target_len :] + p.tokens
            rows.append(ragged.Row(s.target_cache, s.target_len, new, list(range(len(new) - len(p.tokens) - 1, len(new)))))
        caches, logits = self._forward_target(rows)
        t_target = time.perf_counter() - t0
        if not prefill:
            self.costs.record_target(sum(len(r.new) for r in rows), t_target, len(rows))

        t0 = time.perf_counter()
        target, tokens, num_accepted = self._verify(seqs, proposals, logits)
        reports = self._logprobs(seqs, target, tokens, num_accepted)
        t_kernel = time.perf_counter() - t0

        outs = []
        for i, (s, p) in enumerate(zip(seqs, proposals)):
            k, n = len(p.tokens), int(num_accepted[i])
            before = len(s.all_ids)
            s.target_cache = caches[i]
            if prefill:
                self._keep_prefix(s, starts[i], before)
            s.target_cache.crop(before + n)
            s.target_len = before + n
            self._drafter(s).rollback(s, before + n)
            s.step_index += 1
            if s.constraint is not None:
                s.constraint.commit([int(t) for t in tokens[i, : n + 1]])
            # The drafter's own tokens count: forced ones are certain, and ones the format cut off were rejected.
            forced_accepted = sum(1 for j in p.forced if j < n)
            kd, nd = k - len(p.forced) + p.dropped, n - forced_accepted
            s.alpha.update(kd, nd)
            if kd:
                s.shared_alpha.update(kd, nd)
            s.probe.record(kd, nd)
            m = s.metrics
            m.record_proposal(kd, nd)
            m.forced += forced_accepted
            m.verify_steps += 1
            m.step_tokens += n + 1
            outs.append(self._emit(s, [int(t) for t in tokens[i, : n + 1]], *reports[i]))
            m.draft_s += p.seconds
            if prefill:
                m.prefill_s += t_target
            else:
                m.target_s += t_target
            m.kernel_s += t_kernel
            if s.constraint is not None:
                m.grammar_s = s.constraint.seconds
        elapsed = time.perf_counter() - t_step
        for s, p in zip(seqs, proposals):
            s.metrics.other_s += elapsed - p.seconds - t_target - t_kernel
        return outs

    @torch.inference_mode()
    def _prefill_chunk(self, seq: Sequence, chunk: int) -> StepOutput:
        """Feed the target the next ``chunk`` prompt tokens; no logits, nothing emitted."""
        t0 = time.perf_counter()
        row = ragged.Row(seq.target_cache, seq.target_len, seq.all_ids[seq.target_len : seq.target_len + chunk], [])
        caches, _ = self._forward_target([row])
        start, seq.target_cache, seq.target_len = seq.target_len, caches[0], seq.target_len + chunk
        self._keep_prefix(seq, start, seq.target_len)
        seq.metrics.prefill_s += time.perf_counter() - t0
        return StepOutput([], "", None)

    def _forward_target(self, rows: list[ragged.Row]) -> tuple[list, list[torch.Tensor]]:
        if self._target_decoder is not None:
            return self._target_decoder.forward(rows, self.vocab_size)
        return ragged.forward(self.target.model, rows, self.vocab_size)

    def _propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        """Each drafter proposes for its own sequences, all of them in one batched call."""
        proposals: list[Proposal | None] = [None] * len(seqs)
        for method in dict.fromkeys(s.method for s in seqs):
            idx = [i for i, s in enumerate(seqs) if s.method == method]
            for i, p in zip(idx, self._drafters[method].propose([seqs[i] for i in idx], [gammas[i] for i in idx])):
                proposals[i] = p
        return proposals

    def _constrain(self, seqs: list[Sequence], proposals: list[Proposal], jump_forward: bool) -> None:
        """Walk each constrained sequence's grammar along its drafts. A proposal ends before the first token the
        grammar forbids (its masked probability is 0: it could not be accepted); then, with ``jump_forward`` (and the
        sequence's own switch, from EngineConfig.jump_forward), tokens the grammar allows alone are appended while
        they last.

        Never in the prefill step: forced tokens there would join the prompt's forward, where a whole aligned block of
        positions takes the GEMM (decoder.RowPlan), not the kernel that decodes them one by one in target-only
        decoding, and the logits after them could differ in their last bits."""
        for s, p in zip(seqs, proposals):
            c = s.constraint
            if c is None:
                continue
            for tok in p.tokens[c.pushed :]:  # a draft model walked along its own drafts already
                if not c.push(tok):
                    break
            if c.pushed < len(p.tokens):  # only model-free drafts: a draft model walked the grammar as it drafted
                p.dropped = len(p.tokens) - c.pushed
                p.tokens = p.tokens[: c.pushed]
            if not (jump_forward and self._drafter(s).proposes):
                continue
            most = self._most_drafts(s)
            while len(p.tokens) < most and (tok := c.forced()) is not None:
                c.push(tok)
                p.forced.append(len(p.tokens))
                p.tokens.append(tok)
                if tok in self.eos_token_ids or tok in s.request.stop_token_ids:
                    break  # the sequence ends there

    def _verify(self, seqs: list[Sequence], proposals: list[Proposal], logits: list[torch.Tensor]):
        """Pad the rows to a common K, mask them, and run the acceptance kernel once for the batch.
        Returns (the masked logits [B, K+1, V], tokens, num_accepted)."""
        ks = [len(p.tokens) for p in proposals]
        K = max(ks)
        target = torch.zeros(len(seqs), K + 1, self.vocab_size, dtype=logits[0].dtype)
        drafts = np.zeros((len(seqs), K), dtype=np.int64)
        for i, (row, p) in enumerate(zip(logits, proposals)):
            target[i, : len(row)] = row
            drafts[i, : len(p.tokens)] = p.tokens
        self._mask_padding(target)
        for i, (s, p) in enumerate(zip(seqs, proposals)):
            if s.constraint is not None:  # position j: the grammar after the first j drafts
                for j in range(len(p.tokens) + 1):
                    grammar.apply(target[i, j], s.constraint.mask_at(j))
        q = None
        if any(p.q is not None and not s.request.sampling.greedy for s, p in zip(seqs, proposals)):
            q = torch.zeros(len(seqs), K, self.vocab_size, dtype=torch.float32)
            for i, p in enumerate(proposals):
                drafted = 0 if p.q is None else len(p.q)  # one-hot after: forced tokens, model-free drafts
                if drafted:
                    q[i, :drafted] = p.q
                rest = torch.arange(drafted, len(p.tokens))
                q[i, rest, torch.as_tensor(p.tokens[drafted:], dtype=torch.long)] = 1.0
        tokens, num_accepted = self.kernels.verify(
            target,
            drafts,
            q,
            np.asarray(ks, dtype=np.int32),
            **stack_filters([s.request.sampling for s in seqs]),
            seed=np.array([s.seed for s in seqs], dtype=np.uint64),
            offset=np.array([s.step_index for s in seqs], dtype=np.uint64),
        )
        return target, tokens, num_accepted

    def _logprobs(self, seqs: list[Sequence], target: torch.Tensor, tokens, num_accepted) -> list[tuple]:
        """(logprobs, top logprobs) of each sequence's emitted tokens, (None, None) where not asked for. Position j
        of a row holds the masked target logits the token at j was drawn from (accepted, corrected or bonus), which
        decoding without drafts computes alike: the values equal target-only decoding's."""
        wants = [i for i, s in enumerate(seqs) if s.request.reports_logprobs]
        reports: list[tuple] = [(None, None)] * len(seqs)
        if not wants:
            return reports
        rows = [(i, j) for i in wants for j in range(int(num_accepted[i]) + 1)]
        top_n = max(seqs[i].request.top_logprobs for i in wants)
        samplings = [seqs[i].request.sampling for i, _ in rows]  # the same processing as verify's
        lp, ids, top = sampling.logprobs(
            torch.stack([target[i, j] for i, j in rows]), np.array([int(tokens[i, j]) for i, j in rows]),
            top_n=top_n, **stack_filters(samplings))  # fmt: skip
        at = 0
        for i in wants:
            n, want = int(num_accepted[i]) + 1, seqs[i].request.top_logprobs
            tops = None
            if want:  # masked and padding ids (logits at MASK_LOGIT) are not alternatives
                live = top[at : at + n, :want] > grammar.MASKED_LOGPROB
                tops = [TopLogprobs(ids[r, :want][live[r - at]].tolist(), top[r, :want][live[r - at]].tolist())
                        for r in range(at, at + n)]  # fmt: skip
            reports[i] = ([float(x) for x in lp[at : at + n]], tops)
            at += n
        return reports

    def _mask_padding(self, logits: torch.Tensor) -> None:
        """Ids past the tokenizer exist only as embedding padding: never drafted, never emitted."""
        if self.real_vocab < self.vocab_size:
            logits[..., self.real_vocab :] = grammar.MASK_LOGIT

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[float] | None,
              top_logprobs: list[TopLogprobs] | None) -> StepOutput:  # fmt: skip
        req, m = seq.request, seq.metrics
        emitted: list[int] = []
        text = ""
        reason: FinishReason | None = None
        for tok in tokens:
            seq.all_ids.append(tok)
            emitted.append(tok)
            m.completion_tokens += 1
            if m.first_token_at is None:
                m.first_token_at = time.perf_counter()
            if tok in req.stop_token_ids:
                reason = FinishReason.STOP_TOKEN
            elif tok in self.eos_token_ids and not req.ignore_eos:
                reason = FinishReason.EOS
            else:
                text += seq.detok.add(tok)
                if seq.detok.matched_stop is not None:
                    reason = FinishReason.STOP_SEQUENCE
            if reason is None and m.completion_tokens >= req.max_new_tokens:
                reason = FinishReason.LENGTH
            if reason is not None:
                break
        if reason is not None:
            text += seq.detok.flush()
            if seq.detok.matched_stop is not None:  # the flush completed a stop string: the text ends at it
                reason = FinishReason.STOP_SEQUENCE
            seq.finished, seq.finish_reason = True, reason
            self.release(seq)
        return StepOutput(
            token_ids=emitted,
            text=text,
            logprobs=None if logprobs is None else logprobs[: len(emitted)],
            top_logprobs=None if top_logprobs is None else top_logprobs[: len(emitted)],
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            matched_stop=seq.matched_stop,
        )


def _packs(seqs: list[Sequence], most_tokens: int) -> list[list[Sequence]]:
    """``seqs`` in order, grouped greedily into packs of at most ``most_tokens`` prompt tokens (a longer prompt alone)."""
    packs: list[list[Sequence]] = []
    tokens = 0
    for s in seqs:
        if not packs or tokens + len(s.all_ids) > most_tokens:
            packs.append([])
            tokens = 0
        packs[-1].append(s)
        tokens += len(s.all_ids)
    return packs
