"""Kernel backends by name (``specdec serve --kernels cpu|tt``): the one place that knows both."""

from __future__ import annotations

from specdec.kernels import CpuBackend, KernelBackend

NAMES = ("cpu", "tt")


def open_backend(name: str) -> KernelBackend:
    """"cpu": the C++ kernels. "tt": the tt-metal kernels, which need ttnn and a Tenstorrent device; without them
    RuntimeError says what is missing."""
    if name not in NAMES:
        raise ValueError(f"kernels backend must be 'cpu' or 'tt', got {name!r}")
    if name == "tt":
        from specdec.tt import TtBackend

        return TtBackend()
    return CpuBackend()
