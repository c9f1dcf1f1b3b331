"""Shared set-up for the ttnn-based tests (imported by them; not a pytest conftest).

The tt job runs these in a Python 3.12 venv with ttnn==0.81.1 and a mock cluster descriptor.  The
descriptor comes from ``../shared/tt-metal`` relative to the repository root (CI) or
``TT_METAL_MOCK_CLUSTER_DESC_PATH`` when already set.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def mock_cluster_desc(arch: str = "wormhole_N150") -> Path | None:
    for base in (ROOT.parent / "shared" / "tt-metal", Path("/work/shared/tt-metal")):
        p = base / f"{arch}.yaml"
        if p.exists():
            return p
    return None


def use_mock_cluster() -> None:
    """Point tt-metal at the mock Wormhole N150 descriptor unless a descriptor is already chosen."""
    if not os.environ.get("TT_METAL_MOCK_CLUSTER_DESC_PATH"):
        p = mock_cluster_desc()
        if p is not None:
            os.environ["TT_METAL_MOCK_CLUSTER_DESC_PATH"] = str(p)
