"""``TtBackend``: the kernels' backend interface (``specdec.kernels.KernelBackend``) on a Tenstorrent device."""

from __future__ import annotations

from specdec.tt import runtime


class TtBackend:
    """Acceptance and sampling on a Tenstorrent device by ``path``: "stock" (ttnn operations; ``--kernels tt``) or
    "custom" (the tt-metal program; ``--kernels tt-custom``). Raises RuntimeError at construction when ttnn or a
    device is missing, naming which."""

    def __init__(self, path: str = "stock") -> None:
        if path not in runtime.PATHS:
            raise ValueError(f"path must be one of {runtime.PATHS}, got {path!r}")
        self.path = path
        self.name = "tt" if path == "stock" else "tt-custom"
        reason = runtime.why_unavailable()
        if reason is not None:
            raise RuntimeError(f"--kernels {self.name} is unavailable: {reason}")

    def sample(self, logits, *, return_probs: bool = False, **params):
        if return_probs:
            raise ValueError("return_probs is not supported by the tt backend (the device returns tokens only)")
        return runtime.sample(logits, path=self.path, **params)

    def verify(self, target_logits, draft_tokens, draft_probs, num_draft, **params):
        return runtime.verify(target_logits, draft_tokens, draft_probs, num_draft, path=self.path, **params)
