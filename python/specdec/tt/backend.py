"""``TtBackend``: the kernels' backend interface (``specdec.kernels.KernelBackend``) on a Tenstorrent device."""

from __future__ import annotations

import numpy as np

from specdec.tt import runtime


class TtBackend:
    """Acceptance and sampling on a Tenstorrent device; raises RuntimeError at construction when ttnn or a device
    is missing, naming which."""

    name = "tt"

    def __init__(self) -> None:
        reason = runtime.why_unavailable()
        if reason is not None:
            raise RuntimeError(f"--kernels tt is unavailable: {reason}")

    def sample(self, logits, *, return_probs: bool = False, **params):
        if return_probs:
            raise ValueError("return_probs is not supported by the tt backend (the device returns tokens only)")
        return runtime.sample(logits, **params)

    def verify(self, target_logits, draft_tokens, draft_probs, num_draft, *, return_logprobs: bool = False, **params):
        tokens, num_accepted = runtime.verify(target_logits, draft_tokens, draft_probs, num_draft, **params)
        if not return_logprobs:
            return tokens, num_accepted
        return tokens, num_accepted, _logprobs(target_logits, tokens)


def _logprobs(target_logits, tokens: np.ndarray) -> np.ndarray:
    """log_softmax of the raw logits at each emitted token, NaN-padded: the device kernels return none, so the
    host computes them."""
    raw = target_logits.float().numpy() if hasattr(target_logits, "float") else target_logits
    logits = np.asarray(raw, dtype=np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logz = np.log(np.exp(shifted).sum(-1))
    safe = np.maximum(tokens, 0)[..., None]
    logprobs = np.where(tokens >= 0, np.take_along_axis(shifted, safe, -1)[..., 0] - logz, np.nan)
    return logprobs.astype(np.float32)
