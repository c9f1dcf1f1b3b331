"""How torch's CPU libraries behave in a process that runs the engine, set before torch loads them.

- **Waiting.** torch's OpenMP workers spin for milliseconds after each op by default. Between the tiny torch ops of
  a decode step they then hold both cores while the small-M linear kernel's own threads need them (`python
  bench/verify_cost.py` shows the cost: run it with OMP_WAIT_POLICY=ACTIVE and PASSIVE).
- **Instruction set.** Where SPECDEC_ISA forces the AVX2 path, torch's own kernels (ATen, oneDNN and MKL, which run
  the prefill's GEMM and attention) are held to AVX2 as well, so that an AVX-512 host measures what an AVX2 CPU
  would run, not specdec's kernels on AVX2 beside torch's on AVX-512.

The libraries read these settings once, when torch loads them, so ``prepare`` must run before anything imports
torch: ``specdec serve`` and ``specdec bench`` call it first thing, and so do the microbenchmarks in bench/. A value
the user exported wins. Importing ``specdec`` alone changes nothing, so a client process or an embedding
application keeps its own.
"""

from __future__ import annotations

import os

AVX2_CAPS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def prepare() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if os.environ.get("SPECDEC_ISA", "").strip().lower() == "avx2":
        for name, value in AVX2_CAPS.items():
            os.environ.setdefault(name, value)
