"""``TtBackend``: the kernels' backend interface (``specdec.kernels.KernelBackend``) on a Tenstorrent device."""

from __future__ import annotations


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

    def verify(self, target_logits, draft_tokens, draft_probs, num_draft, **params):
        return runtime.verify(target_logits, draft_tokens, draft_probs, num_draft, **params)
