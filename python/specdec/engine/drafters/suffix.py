"""Suffix drafting across requests: continue the current context the way earlier prompts and outputs of the same
scope continued it (SuffixDecoding, Oliaro et al. 2024), with no model forward.

``SuffixIndex`` holds the recent token sequences of one scope ("documents": a request's prompt and output) and maps
every n-gram of them, n in ``NGRAMS``, to where it ended. A lookup tries the longest n-gram ending the context
first; among the most recent ``CANDIDATES`` earlier places it ended, it follows the most frequent next token step
by step, and stops where that token's share of the candidates left, multiplied along the path, falls below
``MIN_CONFIDENCE``: a long draft where earlier text agrees, a short one or none where it diverged. Its work is
bounded by ``NGRAMS``, ``CANDIDATES`` and the draft's length, whatever the length of the context or of the index
(`python bench/suffix_lookup.py` times it).

The index is bounded in tokens per scope and evicts whole documents, oldest first. A scope is the request's
``speculation.cache_scope`` (empty: the shared default) within its tenant's (``SpeculationParams.scope``; the server
sets the tenant from an mTLS client certificate); requests never draft from another scope's text.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from specdec.engine.drafters.base import Drafter, Proposal
from specdec.engine.sequence import Sequence

NGRAMS = (8, 4, 2, 1)  # match lengths tried, longest first
CANDIDATES = 32  # most recent earlier occurrences a lookup reads
MIN_CONFIDENCE = 0.3  # stop a draft where the path's share of the candidates falls below this
DEFAULT_MAX_TOKENS = 200_000  # tokens kept per scope (and per request, for a request's own index)


class SuffixIndex:
    """The recent documents of one scope and where each of their n-grams ended.

    An n-gram is keyed by its hash and a place by ``doc << 32 | position``: plain ints keep the index small. Two
    n-grams that collide only make a draft that the target rejects; the output never depends on a draft."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.tokens = 0
        self._docs: OrderedDict[int, list[int]] = OrderedDict()
        self._ends: dict[int, list[int]] = {}  # hash of an n-gram → places where it ended, oldest first
        self._next_doc = 0

    def add(self, tokens: list[int]) -> int:
        """Start a document with ``tokens``; returns its id for ``extend``."""
        doc = self._next_doc
        self._next_doc += 1
        self._docs[doc] = []
        self.extend(doc, tokens)
        return doc

    def extend(self, doc: int, tokens: list[int]) -> None:
        """Append tokens to a document (a no-op once it has been evicted); evict the oldest documents past
        ``max_tokens`` (down to nine tenths of it, so that evictions come in batches)."""
        text = self._docs.get(doc)
        if text is None:
            return
        for t in tokens:
            text.append(t)
            end = len(text) - 1
            for key in _keys(text, end):
                self._ends.setdefault(key, []).append(doc << 32 | end)
        self.tokens += len(tokens)
        if self.tokens > self.max_tokens and len(self._docs) > 1:
            self._evict(self.max_tokens * 9 // 10)

    def _evict(self, target: int) -> None:
        gone: set[int] = set()
        keys: set[int] = set()
        while self.tokens > target and len(self._docs) > 1:
            doc, text = self._docs.popitem(last=False)
            self.tokens -= len(text)
            gone.add(doc)
            for end in range(len(text)):
                keys.update(_keys(text, end))
        for key in keys:
            places = [p for p in self._ends[key] if p >> 32 not in gone]
            if places:
                self._ends[key] = places
            else:
                del self._ends[key]

    def lookup(self, context: list[int], limit: int) -> list[int]:
        """Up to ``limit`` tokens that earlier text continued ``context`` with (see the module docstring). The
        context's own last n-gram ends its document, so it continues nothing."""
        if limit <= 0:
            return []
        for n in NGRAMS:
            if len(context) < n:
                continue
            places = self._ends.get(hash(tuple(context[-n:])))
            if not places:
                continue
            continuations = []
            for place in reversed(places[-CANDIDATES - 1 :]):
                doc, end = place >> 32, place & 0xFFFFFFFF
                text = self._docs[doc]
                if end + 1 < len(text):
                    continuations.append(text[end + 1 : end + 1 + limit])
                if len(continuations) == CANDIDATES:
                    break
            if continuations:
                return _likeliest_path(continuations, limit)
        return []


def _keys(text: list[int], end: int) -> list[int]:
    """Hashes of the n-grams of ``text`` that end at ``end``, n in NGRAMS."""
    return [hash(tuple(text[end + 1 - n : end + 1])) for n in NGRAMS if end + 1 >= n]


def _likeliest_path(continuations: list[list[int]], limit: int) -> list[int]:
    """Follow the most frequent next token while its share of the agreeing continuations, multiplied along the
    path, stays at least MIN_CONFIDENCE."""
    path: list[int] = []
    confidence = 1.0
    live = continuations
    for depth in range(limit):
        counts: dict[int, int] = {}
        for c in live:
            if len(c) > depth:
                counts[c[depth]] = counts.get(c[depth], 0) + 1
        if not counts:
            break
        token, count = max(counts.items(), key=lambda kv: kv[1])
        confidence *= count / len(live)
        if confidence < MIN_CONFIDENCE:
            break
        path.append(token)
        live = [c for c in live if len(c) > depth and c[depth] == token]
    return path


@dataclass
class _Seen:
    """Per sequence: how many of its tokens its indexes hold, its document in its scope's shared index (if it
    feeds one), and an index of its own text alone (if it drafts from that)."""

    length: int
    scope: str | None = None
    doc: int = 0
    own: SuffixIndex | None = None
    own_doc: int = 0


class SuffixDrafter(Drafter):
    """Drafts from a per-scope ``SuffixIndex`` that learns every suffix-drafted request's prompt and output; with
    ``shared=False``, from each request's own text alone (prompt lookup: METHOD_NGRAM).

    A seeded sampled request's tokens must depend on its seed alone (``Sequence.reproducible``), and which drafts
    it verifies steers how its random stream is used: it drafts from its own text only, while its text still
    feeds the scope's index for the others."""

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, shared: bool = True) -> None:
        self.max_tokens = max_tokens
        self.shared = shared
        self.indexes: dict[str, SuffixIndex] = {}

    def _sync(self, seq: Sequence) -> _Seen:
        """The sequence's state, with every token of the sequence in its indexes."""
        seen = seq.draft_state
        if seen is None:
            seen = seq.draft_state = _Seen(len(seq.all_ids))
            if self.shared:
                seen.scope = seq.request.speculation.scope
                seen.doc = self.indexes.setdefault(seen.scope, SuffixIndex(self.max_tokens)).add(seq.all_ids)
            if seq.reproducible or not self.shared:
                seen.own = SuffixIndex(self.max_tokens)
                seen.own_doc = seen.own.add(seq.all_ids)
        if len(seq.all_ids) > seen.length:
            new = seq.all_ids[seen.length :]
            if seen.scope is not None:
                self.indexes[seen.scope].extend(seen.doc, new)
            if seen.own is not None:
                seen.own.extend(seen.own_doc, new)
            seen.length = len(seq.all_ids)
        return seen

    def draft(self, seq: Sequence, limit: int) -> list[int]:
        """Up to ``limit`` tokens for ``seq`` from the text it may draft from."""
        seen = self._sync(seq)
        index = seen.own if seen.own is not None else self.indexes[seen.scope]
        return index.lookup(seq.all_ids[-max(NGRAMS) :], limit)

    def propose(self, seqs: list[Sequence], gammas: list[int]) -> list[Proposal]:
        return [Proposal(self.draft(s, g)) for s, g in zip(seqs, gammas)]

    def release(self, seq: Sequence) -> None:
        if seq.draft_state is not None:
            self._sync(seq)  # the output's last tokens, emitted after its last proposal
        seq.draft_state = None
