"""The speculative step: propose γ drafts, verify them in one target forward, accept, emit, roll back.

One step of a sequence, top to bottom (``Engine._step``):
1. choose γ (fixed, or adaptive from the measured α and step costs);
2. the drafter proposes up to γ tokens (draft model on its own KV cache, or n-gram lookup);
3. one target forward over the tokens the target has not seen plus the drafts, LM head only at the
   γ+1 positions being verified;
4. ``kernels.verify`` applies the exact acceptance rule and returns n accepted drafts plus one token;
5. both KV caches are cropped to the accepted prefix (the prefix is never re-prefilled);
6. the emitted tokens pass through stop tokens, EOS, max_new_tokens and stop strings.
The last emitted token is not yet in either cache: it is the first input of the next step.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from specdec import kernels
from specdec.detokenizer import Detokenizer
from specdec.drafters import DraftModelDrafter, Drafter, NgramDrafter, NoDrafter
from specdec.models import LoadedModel, check_pair, load_model, set_threads
from specdec.params import FinishReason, GenerationRequest, Method
from specdec.policy import AcceptanceEstimate, StepCosts, choose_gamma

# Logit given to ids that exist only as embedding padding: finite (the kernels reject Inf) but never chosen.
PADDING_LOGIT = -1e30
# After this many steps at γ = 0 the adaptive policy drafts once, so that a recovering α is noticed.
PROBE_AFTER = 16


@dataclass(frozen=True)
class EngineConfig:
    method: Method = Method.DRAFT
    gamma: int | None = None  # fixed γ; None = adaptive in 0..gamma_max
    gamma_max: int = 8
    ngram_min: int = 1
    ngram_max: int = 4


@dataclass
class StepOutput:
    token_ids: list[int]
    text: str  # UTF-8-safe delta; the deltas of a sequence concatenate to its final text
    logprobs: list[float] | None
    finished: bool = False
    finish_reason: FinishReason | None = None
    matched_stop: str | None = None


@dataclass
class SequenceMetrics:
    prompt_tokens: int
    completion_tokens: int = 0
    proposed: int = 0
    accepted: int = 0
    verify_steps: int = 0
    step_tokens: int = 0  # accepted + 1 per verify step, before any truncation by stops
    per_position_proposed: list[int] = field(default_factory=list)
    per_position_accepted: list[int] = field(default_factory=list)
    first_step_at: float | None = None
    first_token_at: float | None = None
    draft_s: float = 0.0
    target_s: float = 0.0
    kernel_s: float = 0.0
    other_s: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.step_tokens / self.verify_steps if self.verify_steps else 0.0

    @property
    def per_position_acceptance(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.per_position_accepted, self.per_position_proposed)]

    @property
    def ttft_s(self) -> float | None:
        """From the sequence's first step (after any queueing) to its first emitted token."""
        if self.first_token_at is None or self.first_step_at is None:
            return None
        return self.first_token_at - self.first_step_at

    def record_proposal(self, proposed: int, accepted: int) -> None:
        for i in range(proposed):
            if i == len(self.per_position_proposed):
                self.per_position_proposed.append(0)
                self.per_position_accepted.append(0)
            self.per_position_proposed[i] += 1
            self.per_position_accepted[i] += int(i < accepted)
        self.proposed += proposed
        self.accepted += accepted


class Sequence:
    """One request's state: token ids, KV caches, detokenizer, γ policy state and metrics."""

    def __init__(self, request: GenerationRequest, seed: int, drafter: Drafter, detok: Detokenizer) -> None:
        self.request = request
        self.seed = seed
        self.drafter = drafter
        self.detok = detok
        self.all_ids: list[int] = list(request.prompt_ids)
        self.target_cache = None
        self.target_len = 0  # tokens of all_ids held in the target cache
        self.draft_cache = None
        self.draft_len = 0
        self.step_index = 0  # the RNG offset of the next step
        self.alpha = AcceptanceEstimate()
        self.zero_gamma_streak = 0
        self.finished = False
        self.finish_reason: FinishReason | None = None
        self.metrics = SequenceMetrics(prompt_tokens=len(request.prompt_ids))

    @property
    def output_ids(self) -> list[int]:
        return self.all_ids[self.metrics.prompt_tokens :]

    @property
    def text(self) -> str:
        return self.detok.text

    @property
    def matched_stop(self) -> str | None:
        return self.detok.matched_stop


class Engine:
    def __init__(self, target: LoadedModel, draft: LoadedModel | None = None, config: EngineConfig = EngineConfig()) -> None:
        if config.method == Method.DRAFT and draft is None:
            raise ValueError("method 'draft' needs a draft model; give one or choose method 'ngram' or 'none'")
        if draft is not None:
            check_pair(target, draft)
        self.target = target
        self.draft = draft
        self.config = config
        self.tokenizer = target.tokenizer
        rows = [target.vocab_size] + ([draft.vocab_size] if draft is not None else [])
        self.vocab_size = min(rows)  # the ids both models can score
        self.real_vocab = min(self.vocab_size, len(self.tokenizer))  # ids past this are embedding padding
        self.context_length = target.context_length
        self.eos_token_ids = self._eos_ids()
        self.costs = StepCosts()
        self._drafters: dict[Method, Drafter] = {
            Method.NONE: NoDrafter(),
            Method.NGRAM: NgramDrafter(config.ngram_min, config.ngram_max),
        }
        if draft is not None:
            self._drafters[Method.DRAFT] = DraftModelDrafter(draft, self.vocab_size)

    @classmethod
    def load(
        cls,
        target: str,
        draft: str | None = None,
        *,
        dtype: str = "float32",
        draft_dtype: str = "bfloat16",
        device: str = "auto",
        threads: int | None = None,
        config: EngineConfig = EngineConfig(),
    ) -> Engine:
        set_threads(threads)
        t = load_model(target, dtype=dtype, device=device)
        d = load_model(draft, dtype=draft_dtype, device=device) if draft else None
        if d is None and config.method == Method.DRAFT:
            config = replace(config, method=Method.NGRAM)
        return cls(t, d, config)

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
            "target_dtype": str(self.target.dtype).removeprefix("torch."),
            "draft_dtype": str(self.draft.dtype).removeprefix("torch.") if self.draft else "",
            "device": str(self.target.device),
            "vocab_size": self.vocab_size,
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
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"messages: the target model {self.target.name!r} has no chat template; send a prompt")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def start(self, request: GenerationRequest) -> Sequence:
        """Validate a request and create its sequence; no model work happens until its first step."""
        request.validate(vocab_size=self.real_vocab, context_length=self.context_length)
        method = request.speculation.method or self.config.method
        if method not in self._drafters:
            raise ValueError(f"speculation.method {method.value!r} needs a draft model; this engine was loaded without one")
        seed = request.sampling.seed if request.sampling.seed is not None else secrets.randbits(63)
        return Sequence(request, seed, self._drafters[method], Detokenizer(self.tokenizer, request.stop))

    def step_batch(self, seqs: list[Sequence]) -> list[StepOutput]:
        """One speculative step for each sequence (prefill on its first)."""
        return [self._step(s) for s in seqs]

    def finish(self, seq: Sequence, reason: FinishReason) -> StepOutput:
        """End a sequence early (cancel, deadline) and free its caches. Idempotent."""
        if not seq.finished:
            seq.finished, seq.finish_reason = True, reason
        self.release(seq)
        return StepOutput([], "", None, True, seq.finish_reason, seq.matched_stop)

    def release(self, seq: Sequence) -> None:
        seq.target_cache = seq.draft_cache = None
        seq.target_len = seq.draft_len = 0

    def generate(self, request: GenerationRequest) -> Iterator[StepOutput]:
        seq = self.start(request)
        try:
            while not seq.finished:
                yield self._step(seq)
        finally:
            self.release(seq)

    # ---- the step -------------------------------------------------------------------------------

    def _gamma(self, seq: Sequence) -> int:
        """γ for this step, capped so that drafts never run past max_new_tokens or the context."""
        if isinstance(seq.drafter, NoDrafter) or seq.target_len == 0:
            return 0  # the first step is the prefill: it emits one token, as fast as possible
        req = seq.request
        cap = min(
            req.max_new_tokens - seq.metrics.completion_tokens - 1,
            self.context_length - len(seq.all_ids) - 1,
        )
        if req.speculation.gamma is not None:
            gamma = req.speculation.gamma
        elif self.config.gamma is not None and req.speculation.gamma_max is None:
            gamma = self.config.gamma
        else:
            gamma_max = req.speculation.gamma_max or self.config.gamma_max
            draft_cost = self.costs.draft.value if isinstance(seq.drafter, DraftModelDrafter) else 0.0
            gamma = choose_gamma(seq.alpha.alpha, draft_cost, self.costs.target_cost, gamma_max)
            seq.zero_gamma_streak = seq.zero_gamma_streak + 1 if gamma == 0 else 0
            if seq.zero_gamma_streak >= PROBE_AFTER:
                gamma, seq.zero_gamma_streak = 1, 0
        return max(0, min(gamma, cap))

    @torch.inference_mode()
    def _step(self, seq: Sequence) -> StepOutput:
        if seq.finished:
            raise ValueError("step on a finished sequence")
        t_step = time.perf_counter()
        m = seq.metrics
        if m.first_step_at is None:
            m.first_step_at = t_step
        prefill = seq.target_len == 0

        proposal = seq.drafter.propose(seq, self._gamma(seq))
        k = len(proposal.tokens)
        if k and isinstance(seq.drafter, DraftModelDrafter):
            self.costs.record_draft(proposal.seconds / k)

        t0 = time.perf_counter()
        before = len(seq.all_ids)
        new = seq.all_ids[seq.target_len :] + proposal.tokens
        out = self.target.model(
            input_ids=torch.tensor([new], device=self.target.device),
            past_key_values=seq.target_cache,
            use_cache=True,
            logits_to_keep=k + 1,
        )
        seq.target_cache = out.past_key_values
        logits = self._verifiable(out.logits[:, -(k + 1) :])
        t_target = time.perf_counter() - t0
        if not prefill:
            self.costs.record_target(k + 1, t_target)

        t0 = time.perf_counter()
        sampling = seq.request.sampling
        q = proposal.q[None] if proposal.q is not None else None
        tokens, num_accepted, logprobs = kernels.verify(
            logits,
            np.asarray([proposal.tokens], dtype=np.int64).reshape(1, k),
            q,
            np.asarray([k], dtype=np.int32),
            **sampling.filters(),
            seed=seq.seed,
            offset=seq.step_index,
            return_logprobs=True,
        )
        t_kernel = time.perf_counter() - t0
        n = int(num_accepted[0])

        seq.target_cache.crop(before + n)
        seq.target_len = before + n
        seq.drafter.rollback(seq, before + n)
        seq.step_index += 1
        seq.alpha.update(k, n)
        m.record_proposal(k, n)
        m.verify_steps += 1
        m.step_tokens += n + 1

        result = self._emit(seq, [int(t) for t in tokens[0, : n + 1]], [float(x) for x in logprobs[0, : n + 1]])
        m.draft_s += proposal.seconds
        m.target_s += t_target
        m.kernel_s += t_kernel
        m.other_s += time.perf_counter() - t_step - proposal.seconds - t_target - t_kernel
        return result

    def _verifiable(self, logits: torch.Tensor) -> torch.Tensor:
        """[1, k+1, V_model] model logits → [1, k+1, vocab_size] on the CPU, padding ids masked."""
        if logits.shape[-1] != self.vocab_size:
            logits = logits[..., : self.vocab_size].contiguous()
        logits = logits.cpu()
        if self.real_vocab < self.vocab_size:
            logits[..., self.real_vocab :] = PADDING_LOGIT
        return logits

    def _emit(self, seq: Sequence, tokens: list[int], logprobs: list[float]) -> StepOutput:
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
            seq.finished, seq.finish_reason = True, reason
            self.release(seq)
        return StepOutput(
            token_ids=emitted,
            text=text,
            logprobs=logprobs[: len(emitted)] if req.logprobs else None,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            matched_stop=seq.matched_stop,
        )
