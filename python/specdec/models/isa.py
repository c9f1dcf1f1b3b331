"""Which instruction-set path the small-M kernels take: the best this CPU runs, or the one SPECDEC_ISA forces.

``SPECDEC_ISA=avx512|avx2|portable`` forces a path, so every x86 path can be tested and measured on any x86 host
that runs it (an AVX-512 host runs all three). ``auto`` (the default) takes AVX-512 (with VNNI) where the CPU has
it, else AVX2 + FMA. A CPU with neither (ARM, or an x86 without AVX2) gets no small-M path: float layers run
through torch's GEMM and quantised layers through a bfloat16 copy of their weights (see ``specdec.models.quant``),
and ``describe()`` says so in the log at start.
"""

from __future__ import annotations

import functools
import os

from specdec import _kernels

PATHS = {"portable": 0, "avx2": 1, "avx512": 2}
ENV = "SPECDEC_ISA"


@functools.cache
def supported() -> list[str]:
    """The paths this CPU runs, best first."""
    return [name for name in ("avx512", "avx2", "portable") if _kernels.cpu_supports(PATHS[name])]


def resolve(name: str | None = None) -> str | None:
    """The path to take: ``name``, else $SPECDEC_ISA, else ``auto``; None where auto finds no vector path.

    ValueError names the variable and the paths this CPU allows when the choice is unknown or unsupported here.
    """
    choice = (name or os.environ.get(ENV) or "auto").strip().lower()
    allowed = supported()
    if choice == "auto":
        return allowed[0] if allowed[0] != "portable" else None
    if choice not in PATHS or choice not in allowed:
        raise ValueError(f"{ENV} must be auto or one of {allowed} on this CPU, got {choice!r}")
    return choice


# The path of this process, fixed at import: every forward takes the same path, so a verify and a decode step
# agree bit for bit.
ISA: str | None = resolve()


def code(isa: str | None = None) -> int:
    """The kernels' number for ``isa`` (default: this process's path); ValueError where there is no such path."""
    isa = resolve(isa) if isa else ISA
    if isa is None:
        raise ValueError("this CPU has no small-M kernel path (no AVX2); use torch's GEMM")
    return PATHS[isa]


def describe() -> str:
    """One line for the log at start: the path taken and why."""
    if ISA is None:
        return "small-M kernels: no AVX2 or AVX-512 on this CPU, so linear layers use torch's GEMM (quantised weights as bfloat16)"
    forced = f" (forced by {ENV})" if os.environ.get(ENV, "auto").strip().lower() not in ("", "auto") else ""
    return f"small-M kernels: {ISA} path{forced}; this CPU runs {', '.join(supported())}"
