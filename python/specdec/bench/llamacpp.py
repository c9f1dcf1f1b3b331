"""llama.cpp's target-only decoding on the same GGUF file: the peer a CPU user already has (``--compare-llamacpp``).

It runs through llama-cpp-python, an optional extra (``pip install 'specdec[llamacpp]'``; it builds llama.cpp from
source), in the benchmark's own process: the same prompt ids, the same number of new tokens, the same sampling
(greedy: top-1 with no repetition penalty) and the same thread count, interleaved with specdec's runs.

Build it without OpenMP (``CMAKE_ARGS="-DGGML_OPENMP=OFF"``): specdec makes OpenMP threads sleep when idle
(``specdec.torch_env``), and an OpenMP llama.cpp in the same process inherits that and loses a quarter of its decode
speed, which would flatter specdec. The report records which build ran (``llamacpp_openmp``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from specdec.types import SamplingParams


class LlamaCpp:
    """One llama.cpp context over the GGUF file ``path``; ``run`` times one request like the engine's runs."""

    def __init__(self, path: str, *, threads: int, context: int) -> None:
        if not str(path).endswith(".gguf"):
            raise ValueError(f"--compare-llamacpp needs a .gguf target, got {path!r}")
        try:
            import llama_cpp
        except ImportError as e:
            raise ValueError("--compare-llamacpp needs llama-cpp-python: pip install 'specdec[llamacpp]'") from e
        self.llm = llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=context,
                                   verbose=False)  # fmt: skip
        self.version = _version()
        self.system_info = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
        self.openmp = "OPENMP = 1" in self.system_info

    def run(self, prompt_ids: list[int], max_new_tokens: int, sampling: SamplingParams, seed: int,
            check: Callable[[], None]) -> tuple[list[int], float, float]:  # fmt: skip
        """Generate ``max_new_tokens`` after ``prompt_ids`` from an empty cache: (ids, TTFT s, wall s)."""
        self.llm.reset()
        self.llm.set_seed(seed)
        greedy = sampling.greedy
        options = dict(temp=0.0 if greedy else sampling.temperature, top_k=1 if greedy else sampling.top_k,
                       top_p=1.0 if greedy else sampling.top_p, min_p=0.0, repeat_penalty=1.0, reset=True)  # fmt: skip
        out: list[int] = []
        t0 = time.perf_counter()
        ttft = 0.0
        for token in self.llm.generate(prompt_ids, **options):
            if not out:
                ttft = time.perf_counter() - t0
            out.append(int(token))
            check()
            if len(out) >= max_new_tokens:
                break
        return out, ttft, time.perf_counter() - t0


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("llama_cpp_python")
    except Exception:
        return "?"
