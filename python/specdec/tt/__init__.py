"""Tenstorrent (tt-metal) backend for the acceptance and sampling kernels; see docs/tenstorrent.md.

Status: nothing here has yet run on hardware. Two paths compute the CPU kernels' ``verify``/``sample`` on a device:

* ``stock`` (the default, ``--kernels tt``): a short sequence of stock ttnn operations, the algorithm written once
  against an operations interface: ``TtnnOps`` (``ops_ttnn``) on a device, ``NumpyOps`` (``ops_numpy``) as its
  numpy model in the tests;
* ``custom`` (``--kernels tt-custom``): the tt-metal program in ``csrc/tt``; ``model`` (numpy only) is its
  tile-faithful model, ``program`` builds its ttnn ProgramDescriptor.

``runtime.verify``/``sample`` run either path and raise RuntimeError when ttnn or a device is absent; ``TtBackend``
puts them behind the kernels' backend interface.
"""
from __future__ import annotations

from specdec.tt.backend import TtBackend
from specdec.tt.runtime import PATHS, available, sample, verify, why_unavailable

__all__ = ["PATHS", "TtBackend", "available", "why_unavailable", "sample", "verify"]
