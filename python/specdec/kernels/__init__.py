"""The Python face of the C++ kernels: sampling, speculative verification and logprobs (``sampling``), and the backend
interface the engine calls them through (``backend``)."""

from specdec.kernels.backend import CpuBackend, KernelBackend
from specdec.kernels.sampling import (
    GREEDY_TEMPERATURE,
    STREAM_SAMPLE,
    STREAM_VERIFY,
    NonFiniteLogitsError,
    logprobs,
    num_threads,
    philox4x32_10,
    sample,
    set_num_threads,
    uniforms,
    verify,
)

__all__ = [
    "CpuBackend",
    "KernelBackend",
    "GREEDY_TEMPERATURE",
    "STREAM_SAMPLE",
    "STREAM_VERIFY",
    "NonFiniteLogitsError",
    "logprobs",
    "num_threads",
    "philox4x32_10",
    "sample",
    "set_num_threads",
    "uniforms",
    "verify",
]
