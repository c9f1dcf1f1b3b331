"""What one benchmark run measures (``specdec bench`` flags and the Benchmark RPC's fields)."""

from __future__ import annotations

from dataclasses import dataclass, field

from specdec.bench.prompts import Prompt, builtin_prompts
from specdec.types import Method, SamplingParams, SpeculationParams


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
    compare_llamacpp: bool = False  # also run llama.cpp's target-only decoding on the target's GGUF file (the CPU peer)
    chat: bool = True  # wrap prompts in the target's chat template when it has one
    # --concurrency: streams run at once (run_concurrency); each runs requests_per_stream requests in turn.
    concurrency: list[int] = field(default_factory=list)
    requests_per_stream: int = 2
    max_prompt_tokens: int | None = None  # each prompt's tokens at most (the server's --max-prompt-tokens)

    def validate(self, prefix: str = "speculation.") -> None:
        """``prefix`` names gamma and gamma_max as the caller spells them (the Benchmark RPC: no prefix)."""
        if not 0 <= self.warmup < len(self.prompts):
            raise ValueError(f"warmup must be in [0, {len(self.prompts)}) for {len(self.prompts)} prompts, got {self.warmup}")
        if self.max_new_tokens < 2:
            raise ValueError(f"max_new_tokens must be >= 2 (decode rate needs a second token), got {self.max_new_tokens}")
        if self.method == Method.NONE:
            raise ValueError("the drafter under test must be 'draft' or 'ngram' ('none' is the baseline)")
        SpeculationParams(self.method, self.gamma, self.gamma_max).validate(prefix)
        self.sampling.validate()
        if any(n < 1 for n in self.concurrency):
            raise ValueError(f"concurrency levels must be >= 1, got {self.concurrency}")
        if self.requests_per_stream < 1:
            raise ValueError(f"requests_per_stream must be >= 1, got {self.requests_per_stream}")
