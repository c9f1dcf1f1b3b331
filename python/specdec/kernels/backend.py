"""The interface the engine calls for acceptance and sampling, and its CPU implementation.

An engine is given a backend object (``Engine(..., kernels=...)``); nothing here is a process-wide setting.
``specdec.tt.TtBackend`` is the Tenstorrent implementation of the same interface, and ``specdec.backends``
opens either by name.
"""

from __future__ import annotations

from typing import Protocol

from specdec.kernels import sampling


class KernelBackend(Protocol):
    """``sample`` and ``verify`` with the contract of ``specdec.kernels.sampling`` (shapes, parameters, uniforms)."""

    name: str

    def sample(self, logits, *, return_probs: bool = False, **params): ...

    def verify(self, target_logits, draft_tokens, draft_probs, num_draft, **params): ...


class CpuBackend:
    """The C++ kernels of ``specdec._kernels``."""

    name = "cpu"

    def sample(self, logits, *, return_probs: bool = False, **params):
        return sampling.sample(logits, return_probs=return_probs, **params)

    def verify(self, target_logits, draft_tokens, draft_probs, num_draft, **params):
        return sampling.verify(target_logits, draft_tokens, draft_probs, num_draft, **params)
