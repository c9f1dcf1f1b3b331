"""Constrained output (``response_format``) through llguidance: a grammar's token mask at every position.

The engine masks the target's logits at each verified position with the grammar state after the tokens before it,
then processes them as usual, so every token comes from the masked target distribution whichever drafter proposed
it. A sequence's ``Constraint`` walks ahead along the step's drafts (``push``), gives each position's mask, and
after the step goes back to the emitted tokens (``commit``).

llguidance, not xgrammar: its wheel is one abi3 binary with no dependencies (xgrammar pulls in torch and
transformers pins of its own), it compiles JSON Schema, regexes and Lark with explicit resource limits, and its
matcher rolls back, which a rejected draft needs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
import torch

from specdec.types import ResponseFormat

# What a forbidden token's logit becomes: finite, as the kernels require, and far below any real logit.
MASK_LOGIT = -1e30
# A logprob below this comes from a forbidden token's logit (MASK_LOGIT over a temperature of at most 100): it is
# reported as -inf and left out of top lists.
MASKED_LOGPROB = -1e20
# The grammar engine's work bounds (llguidance.LLParserLimits): a step that needs more ends its request with an
# error, so one request cannot stall the others. The lexer's initial fuel is a tenth of llguidance's default, which
# lets a pathological regex such as (a{1000}){1000} spend over a second on its first mask.
LIMITS = dict(max_grammar_size=500_000, initial_lexer_fuel=100_000, step_lexer_fuel=50_000, step_max_items=50_000)
# Seconds a format may take to compile and give its first mask (on the server's request thread, not the engine's).
COMPILE_SECONDS = 1.0


class GrammarError(RuntimeError):
    """The grammar allows no token where it must allow one (a step limit was hit): the request cannot go on."""


# JSON on one line, with a space after each separator as models write it. Whitespace left free lets a model pad
# forever between tokens (a weak model does); a schema may still ask for it with "x-guidance": {"whitespace_flexible":
# true}.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Compiled grammars kept per engine: services send the same few schemas again and again.
CACHED_GRAMMARS = 64


class GrammarCompiler:
    """Compiles a request's ``ResponseFormat`` for one tokenizer, keeping the last CACHED_GRAMMARS. Thread-safe; the
    tokenizer's token table (a second or more for a 150k vocabulary) is built on first use."""

    def __init__(self, tokenizer, vocab_rows: int, eos_ids: frozenset[int]) -> None:
        self._hf = tokenizer
        self.vocab_rows = vocab_rows
        self._eos = sorted(eos_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[ResponseFormat, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_rows, eos_token=self._eos)
            return self._tokenizer

    def compile(self, fmt: ResponseFormat) -> Grammar:
        """The grammar of ``fmt``; ValueError naming ``response_format`` with the compiler's message if it fails."""
        with self._lock:
            if fmt in self._cache:
                self._cache.move_to_end(fmt)
                return self._cache[fmt]
        grammar = Grammar(_grammar_text(fmt), self._llg_tokenizer(), self.vocab_rows, f"response_format.{fmt.kind}")
        with self._lock:
            self._cache[fmt] = grammar
            while len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return grammar


def _grammar_text(fmt: ResponseFormat) -> str:
    try:
        if fmt.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(json.loads(fmt.spec), defaults=JSON_LAYOUT)
        if fmt.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        if fmt.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(fmt.spec)
        return llguidance.LLMatcher.grammar_from_lark(fmt.spec)
    except (ValueError, TypeError, RecursionError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"response_format.{fmt.kind} does not compile: {e}") from None


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS)


class Grammar:
    """A compiled grammar; ``constraint()`` starts a sequence's matcher at its beginning."""

    def __init__(self, text: str, tokenizer: llguidance.LLTokenizer, vocab_rows: int, field: str) -> None:
        t0 = time.perf_counter()
        self._start = llguidance.LLMatcher(tokenizer, text, log_level=0, limits=_limits())
        self.vocab_rows = vocab_rows
        if not self._start.is_error():  # the first mask builds most of the lexer, which the copies share
            words = np.empty((vocab_rows + 31) // 32, dtype=np.int32)
            self._start.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self._start.is_error():
            raise ValueError(f"{field} does not compile: {self._start.get_error().strip()}")
        seconds = time.perf_counter() - t0
        if seconds > COMPILE_SECONDS:
            raise ValueError(f"{field} took {seconds:.2f} s to compile, over the limit of {COMPILE_SECONDS} s")

    def constraint(self, jump_forward: bool = True) -> Constraint:
        return Constraint(self._start.deep_copy(), self.vocab_rows, jump_forward)


class Constraint:
    """One sequence's grammar state: after its emitted tokens, plus ``pushed`` tokens drafted this step.

    ``allowed()`` is the mask at the current state, ``push`` advances along a draft (refusing a token the grammar
    forbids), ``mask_at(j)`` gives the mask after the first j pushed tokens, and ``commit`` returns to the emitted
    tokens and consumes the step's output. ``seconds`` adds up the time spent in the grammar.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_rows: int, jump_forward: bool = True) -> None:
        self._m = matcher
        self.jump_forward = jump_forward  # whether forced() names the tokens the format allows alone
        self._words = np.empty((vocab_rows + 31) // 32, dtype=np.int32)
        self._vocab_rows = vocab_rows
        self._masks: list[np.ndarray] = []  # by depth: the mask after 0, 1, ... pushed tokens, as computed
        self.pushed = 0
        self._consumed = 0  # of the pushed tokens, those the matcher consumed (what unwind rolls back)
        self.seconds = 0.0

    def allowed(self) -> np.ndarray:
        """bool[vocab_rows]: the tokens the grammar allows after the emitted and pushed tokens."""
        if len(self._masks) == self.pushed:
            t0 = time.perf_counter()
            self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            mask = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._vocab_rows].view(bool)
            self.seconds += time.perf_counter() - t0
            if not mask.any():
                raise GrammarError(f"response_format: the grammar allows no token here: {self._m.get_error() or 'a step limit was hit'}")  # fmt: skip
            self._masks.append(mask)
        return self._masks[self.pushed]

    def push(self, token: int) -> bool:
        """Advance along a drafted token; False (and no change) when the grammar forbids it."""
        if not self.allowed()[token]:
            return False
        self._consume([token])
        self.pushed += 1
        return True

    def _consume(self, tokens: list[int]) -> None:
        """A stopped matcher (the format is complete) allows only EOS, which ends the sequence: it consumes nothing."""
        t0 = time.perf_counter()
        for tok in tokens:
            if self._m.is_stopped():
                break
            if not self._m.consume_token(tok):  # the mask allowed it, so only a limit can refuse it
                raise GrammarError(f"response_format: {self._m.get_error()}")
            self._consumed += 1
        self.seconds += time.perf_counter() - t0

    @property
    def stopped(self) -> bool:
        """Whether the format is complete and allows only EOS from here."""
        return self._m.is_stopped()

    def forced(self) -> int | None:
        """The only token the grammar allows at the current state; None when it allows more than one, or with
        jump-forward off."""
        if not self.jump_forward:
            return None
        mask = self.allowed()
        return int(np.argmax(mask)) if np.count_nonzero(mask) == 1 else None

    def mask_at(self, depth: int) -> torch.Tensor:
        """bool[vocab_rows] after the first ``depth`` <= ``pushed`` pushed tokens."""
        if depth == self.pushed:
            self.allowed()
        return torch.from_numpy(self._masks[depth])

    def unwind(self) -> None:
        """Forget the pushed tokens: back to the state after the emitted ones."""
        if self._consumed:
            self._m.rollback(self._consumed)
        self.pushed = self._consumed = 0
        self._masks.clear()

    def commit(self, tokens: list[int]) -> None:
        """Forget the pushed tokens and consume the step's emitted ones."""
        self.unwind()
        self._consume(tokens)
        self._consumed = 0


def apply(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Set the logits of the tokens ``mask`` forbids to MASK_LOGIT, in place. logits: [..., V] with V >= len(mask)
    (ids past the mask are forbidden too); mask: bool[vocab_rows]."""
    n = min(mask.shape[0], logits.shape[-1])
    logits[..., :n].masked_fill_(~mask[:n], MASK_LOGIT)
    logits[..., n:] = MASK_LOGIT
