"""The small draft model proposes γ tokens per sequence, batched across sequences, on each sequence's own KV
cache (greedy or sampled; it returns its processed distributions q for the acceptance rule)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from specdec.engine import grammar
from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.gamma import StepCosts
from specdec.engine.prefix_cache import PrefixCache, key
from specdec.engine.sequence import Sequence
from specdec.kernels import KernelBackend
from specdec.models import decoder, ragged
from specdec.models.loading import LoadedModel
from specdec.types import stack_filters

# The draft samples from its own random stream: another Philox key than the target's.
DRAFT_SEED_SALT = 0x9E3779B97F4A7C15
OFFSETS_PER_STEP = 64
# A sequence with more tokens than this to catch up on (its prompt, after the prefill) drafts alone, so
# that one long row does not pad every other row of the batch to its length.
BATCH_CATCH_UP = 8


@dataclass
class DraftCache:
    """What the drafter keeps per sequence: the draft's KV cache over the first ``length`` tokens, and how many of
    them a cold prefill would compute alike (PrefixCache.extend; None until the prefix cache was asked)."""

    cache: object | None = None
    length: int = 0
    canonical: int | None = None


class DraftModelDrafter(Drafter):
    """One batched draft forward per draft position.

    With ``lean`` (and a model it serves) the forwards run ``decoder.Decoder``, else transformers'.
    The drafter records the time of its forwards in ``costs``, the engine's model of a step's cost, which the
    γ policy reads beside the target's.
    """

    runs_model = True

    def __init__(
        self, draft: LoadedModel, vocab_size: int, costs: StepCosts, kernels: KernelBackend, *, lean: bool = True,
        draft_vocab: int = 0, prefix_cache: PrefixCache | None = None,
    ) -> None:  # fmt: skip
        """``draft_vocab``: score only this many of the most frequent ids in the lean forward (0: all).
        ``prefix_cache``: where the draft's catch-up on a prompt starts from and leaves its blocks (lean only)."""
        self.model = draft.model
        self.vocab_size = vocab_size
        self.costs = costs
        self.kernels = kernels
        self.decoder = None
        if lean and decoder.supports(draft.model):
            vocab = decoder.frequent_ids(draft.tokenizer, draft_vocab) if 0 < draft_vocab < vocab_size else None
            self.decoder = decoder.Decoder(draft.model, vocab)
        self.prefix_cache = prefix_cache if self.decoder is not None else None

    def _state(self, seq: Sequence) -> DraftCache:
        if seq.draft_state is None:
            seq.draft_state = DraftCache()
        st = seq.draft_state
        if st.canonical is None:  # a new sequence: start from the longest cached prefix of its tokens
            st.canonical = 0
            if self.prefix_cache is not None and st.length == 0:
                cache, length = self.prefix_cache.load(key("draft", seq), seq.all_ids, len(seq.all_ids) - 1)
                if length:
                    st.cache, st.length, st.canonical = cache, length, length
        return st

    def pending(self, seq: Sequence) -> int:
        return len(seq.all_ids) - self._state(seq).length

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        """A sequence with a response format drafts from the draft's masked distribution and walks its grammar along:
        a token the format allows alone is proposed without a draft forward (it joins the next forward's pending
        tokens), and drafting stops where the format forbids the token drafted (possible only when the draft
        vocabulary holds none of the allowed ones)."""
        gammas = list(gammas)
        out = [Proposal([]) for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        pending = [s.all_ids[self._state(s).length :] for s in seqs]
        for j in range(max(gammas, default=0)):
            live = []
            for i in (i for i, g in enumerate(gammas) if g > j):
                c = seqs[i].constraint
                if c is not None and c.stopped:  # only EOS is left, which the engine appends
                    gammas[i] = j
                elif c is not None and (tok := c.forced()) is not None:  # no forward for what the format forces
                    c.push(tok)
                    out[i].forced.append(len(out[i].tokens))
                    out[i].tokens.append(tok)
                    qs[i].append(None if seqs[i].request.sampling.greedy else _one_hot(tok, self.vocab_size))
                    pending[i] = pending[i] + [tok]
                else:
                    live.append(i)
            alone = [[i] for i in live if len(pending[i]) > BATCH_CATCH_UP]
            together = [i for i in live if len(pending[i]) <= BATCH_CATCH_UP]
            for group in alone + ([together] if together else []):
                t0 = time.perf_counter()
                tokens, q = self._draft_one_position([seqs[i] for i in group], [pending[i] for i in group], j)
                seconds = time.perf_counter() - t0
                self.costs.record_draft(len(group) * max(len(pending[i]) for i in group), seconds)
                for i, tok, qi in zip(group, tokens, q):
                    out[i].seconds += seconds
                    if seqs[i].constraint is not None and not seqs[i].constraint.push(tok):
                        gammas[i] = j
                        out[i].dropped += 1
                        continue
                    out[i].tokens.append(tok)
                    qs[i].append(qi)
                    pending[i] = [tok]
        for s, p, q in zip(seqs, out, qs):
            # Only a sampled row needs q, and it has one at every position (its group is always sampled); a greedy
            # row may have drafted some positions beside a sampled row (q) and later ones without (None).
            p.q = torch.stack(q) if q and not s.request.sampling.greedy else None
        return out

    def _draft_one_position(
        self, seqs: list[Sequence], pending: list[list[int]], j: int
    ) -> tuple[list[int], list[torch.Tensor | None]]:
        states = [self._state(s) for s in seqs]
        rows = [ragged.Row(st.cache, st.length, p, [len(p) - 1]) for st, p in zip(states, pending)]
        if self.decoder is not None:
            caches, logits = self.decoder.forward(rows, self.vocab_size)
        else:
            caches, logits = ragged.forward(self.model, rows, self.vocab_size)
        for s, st, c, p in zip(seqs, states, caches, pending):
            start, st.cache, st.length = st.length, c, st.length + len(p)
            if self.prefix_cache is not None and j == 0:  # the catch-up reads only tokens of all_ids
                st.canonical = self.prefix_cache.extend(key("draft", s), s.all_ids, c, st.canonical, start, st.length)
        # q matters only to sampled rows: greedy ones are verified against argmax p alone.
        sampled = any(not s.request.sampling.greedy for s in seqs)
        logits = torch.cat(logits).cpu()
        for row, s in zip(logits, seqs):
            if s.constraint is not None:
                grammar.apply(row, torch.from_numpy(s.constraint.allowed()))
        result = self.kernels.sample(
            logits,
            **stack_filters([s.request.sampling for s in seqs]),
            seed=np.array([s.seed ^ DRAFT_SEED_SALT for s in seqs], dtype=np.uint64),
            offset=np.array([s.step_index * OFFSETS_PER_STEP + j for s in seqs], dtype=np.uint64),
            return_probs=sampled,
        )
        tokens, q = result if sampled else (result, [None] * len(seqs))
        return [int(t) for t in tokens], list(torch.as_tensor(q)) if sampled else q

    def rollback(self, seq: Sequence, valid_len: int) -> None:
        st = seq.draft_state
        if st is not None and st.cache is not None and st.length > valid_len:
            st.cache.crop(valid_len)
            st.length = valid_len
            st.canonical = min(st.canonical or 0, valid_len)


def _one_hot(token: int, vocab_size: int) -> torch.Tensor:
    q = torch.zeros(vocab_size, dtype=torch.float32)
    q[token] = 1.0
    return q
