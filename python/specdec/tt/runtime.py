"""Running the device program: ``verify`` / ``sample`` through ttnn.generic_op (needs a device)."""
from __future__ import annotations

import os


def why_unavailable() -> str | None:
    """None when ttnn imports and a Tenstorrent device can be opened, else the reason."""
    if os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"):
        return "TT_METAL_MOCK_CLUSTER_DESC_PATH is set: a mock cluster has no device to run kernels on"
    try:
        import ttnn  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"ttnn is not importable ({type(exc).__name__}: {exc}); install ttnn==0.81.1 (Python 3.10/3.12)"
    try:
        n = ttnn.GetNumAvailableDevices()
    except Exception as exc:
        return f"no Tenstorrent device ({type(exc).__name__}: {exc})"
    if n < 1:
        return "no Tenstorrent device detected"
    return None


def available() -> bool:
    return why_unavailable() is None


def verify(*args, **kwargs):  # placeholder replaced below
    raise NotImplementedError


def sample(*args, **kwargs):
    raise NotImplementedError
