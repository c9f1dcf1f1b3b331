"""Incremental, UTF-8-safe detokenisation with stop strings.

Tokens arrive one at a time. Text is released only when it is complete UTF-8 (a byte-level token may end
mid-character) and cannot be the beginning of a stop string, so that streamed deltas concatenate to the
final text exactly and never contain text that a later stop would cut.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class Detokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self._tok = tokenizer
        self._stop = stop
        self._ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read] is decoded context for the next delta
        self._read = 0
        self._held = ""  # decoded but not yet released (possible stop prefix)
        self.text = ""  # released text
        self.matched_stop: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the newly released text. Sets ``matched_stop`` when a stop string ends here."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self._held += after[len(before) :]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """Release everything still held (at the end of generation), incomplete characters included."""
        tail = self._decode(self._ids[self._prefix :])[len(self._decode(self._ids[self._prefix : self._read])) :]
        self._held += tail
        self._prefix = self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, *, final: bool) -> str:
        if self.matched_stop is not None:
            return ""
        window = self.text[-self._longest_stop() :] if self._stop else ""
        hit = self._first_stop(window + self._held)
        if hit is not None:
            cut, self.matched_stop = hit
            delta = (window + self._held)[:cut][len(window) :]
            self._held = ""
            self.text += delta
            return delta
        keep = 0 if final else self._stop_prefix_len(self._held)
        delta, self._held = self._held[: len(self._held) - keep], self._held[len(self._held) - keep :]
        self.text += delta
        return delta

    def _longest_stop(self) -> int:
        return max(len(s) for s in self._stop)

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        hits = [(i, s) for s in self._stop if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best
