"""The engine: sequences, drafters, the γ policy, the speculative step, and the scheduler that steps requests
together on one thread."""

from specdec.engine.core import Engine, EngineConfig
from specdec.engine.sequence import Sequence, StepOutput

__all__ = ["Engine", "EngineConfig", "Sequence", "StepOutput"]
