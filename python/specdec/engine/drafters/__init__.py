"""Drafters: the engine sees only ``base.Drafter``."""

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.drafters.draft_model import DraftModelDrafter
from specdec.engine.drafters.hybrid import HybridDrafter
from specdec.engine.drafters.none import NoDrafter
from specdec.engine.drafters.suffix import SuffixDrafter

__all__ = ["Drafter", "DraftModelDrafter", "HybridDrafter", "NoDrafter", "Proposal", "SuffixDrafter"]
