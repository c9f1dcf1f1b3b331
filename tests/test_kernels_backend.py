"""Kernel backends by name: tt needs ttnn and a device, and says so when they are missing."""

from __future__ import annotations

import numpy as np
import pytest

from specdec import tt
from specdec.backends import open_backend


def test_tt_backend_fails_clearly_without_a_device():
    reason = tt.why_unavailable()
    if reason is None:
        pytest.skip("a Tenstorrent device is present")
    with pytest.raises(RuntimeError, match="--kernels tt is unavailable") as err:
        open_backend("tt")
    assert reason in str(err.value)
    cpu = open_backend("cpu")  # a failed tt backend leaves the CPU kernels usable
    assert cpu.name == "cpu"
    tokens = cpu.sample(np.array([[0.0, 3.0, 1.0]], dtype=np.float32), temperature=0.0)
    assert tokens.tolist() == [1]


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="kernels backend must be 'cpu' or 'tt'"):
        open_backend("gpu")


def test_serve_with_tt_kernels_exits_with_the_reason(tmp_path):
    import subprocess
    import sys

    if tt.why_unavailable() is None:
        pytest.skip("a Tenstorrent device is present")
    proc = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "serve", "--kernels", "tt", "--target", str(tmp_path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--kernels tt is unavailable" in proc.stderr
