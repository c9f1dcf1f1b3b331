"""Counting a sampled law through the engine: one request per seed, run as batches (a sequence's output depends on
its seed alone, so batching changes nothing), outputs tallied as token tuples."""

from __future__ import annotations

from collections.abc import Callable

from specdec.engine import Engine
from specdec.types import GenerationRequest

BATCH = 500


def output_counts(engine: Engine, request_for_seed: Callable[[int], GenerationRequest], trials: int) -> dict[tuple[int, ...], int]:
    counts: dict[tuple[int, ...], int] = {}
    for first in range(0, trials, BATCH):
        seqs = [engine.start(request_for_seed(seed)) for seed in range(first, min(first + BATCH, trials))]
        live = seqs
        while live:
            engine.step_batch(live)
            live = [s for s in live if not s.finished]
        for s in seqs:
            counts[tuple(s.output_ids)] = counts.get(tuple(s.output_ids), 0) + 1
    return counts
