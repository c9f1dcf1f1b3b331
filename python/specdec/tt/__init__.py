"""Tenstorrent (tt-metal) backend for the acceptance and sampling kernels; see docs/tenstorrent.md.

Status: the tt-metal kernels have not yet run on hardware.  ``model`` (numpy only) is the
tile-faithful model of the device algorithm; ``program`` builds the ttnn ProgramDescriptor and needs
ttnn (Python 3.10/3.12 wheels); ``verify``/``sample`` run it on a device and raise RuntimeError when
ttnn or a device is absent. ``TtBackend`` puts them behind the kernels' backend interface.
"""
from __future__ import annotations

from specdec.tt.backend import TtBackend
from specdec.tt.runtime import available, sample, verify, why_unavailable

__all__ = ["TtBackend", "available", "why_unavailable", "sample", "verify"]
