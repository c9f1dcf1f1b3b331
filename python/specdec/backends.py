"""Kernel backends by name (``specdec serve --kernels cpu|tt|tt-custom``): the one place that knows them all.

Importing this module loads no kernels (the CLI reads ``NAMES`` before it configures torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specdec.kernels import KernelBackend

NAMES = ("cpu", "tt", "tt-custom")


def open_backend(name: str) -> KernelBackend:
    """"cpu": the C++ kernels. "tt": stock ttnn operations on a Tenstorrent device; "tt-custom": the custom tt-metal
    program there. Both tt backends need ttnn and a device; without them RuntimeError says what is missing."""
    if name not in NAMES:
        raise ValueError(f"kernels backend must be one of {', '.join(NAMES)}; got {name!r}")
    if name.startswith("tt"):
        from specdec.tt import TtBackend

        return TtBackend("stock" if name == "tt" else "custom")
    from specdec.kernels import CpuBackend

    return CpuBackend()
