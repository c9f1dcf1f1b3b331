"""How torch's OpenMP workers wait, for processes that run the engine on a CPU.

torch's OpenMP workers spin for milliseconds after each op by default. Between the tiny torch ops of a decode
step they then hold both cores while the small-M linear kernel's own threads need them (`python
bench/verify_cost.py` shows the cost: run it with OMP_WAIT_POLICY=ACTIVE and PASSIVE). OpenMP reads the policy
once, when torch loads it, so ``passive_waits`` must run before anything imports torch: ``specdec serve`` and
``specdec bench`` call it first thing, and so do the microbenchmarks in bench/. A value the user exported wins.
Importing ``specdec`` alone changes nothing, so a client process or an embedding application keeps its own.
"""

from __future__ import annotations

import os


def passive_waits() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
