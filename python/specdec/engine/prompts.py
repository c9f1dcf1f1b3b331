"""Prompts to token ids, with the prompt-token limit applied before the work where it can be.

A fast tokenizer must not be used by two threads at once, so each thread that tokenizes holds a
``PromptTokenizer`` of its own: the engine's worker has one, and the server tokenizes text and chat prompts
on a thread of its own with a ``copy()``, so that a long prompt never holds up the engine's steps.
"""

from __future__ import annotations

import copy
import json

from transformers import PreTrainedTokenizerBase


def chars_per_token_bound(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """At most how many characters of a text one token stands for, or None where no bound holds.

    A byte-level BPE token stands for at most as many bytes as its vocabulary string has characters, and a
    byte-fallback token for at most its string's characters; every byte is covered. A normalizer can compose
    two characters into one (NFC), hence the factor 2. A tokenizer that maps unknown text to one token or drops
    characters (word-level, WordPiece) has no such bound, and every text it gets is tokenized.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    spec = json.loads(backend.to_str())
    decoder, model = spec.get("decoder") or {}, spec.get("model") or {}
    decoders = [decoder, *(decoder.get("decoders") or [])]
    if not (any(d.get("type") == "ByteLevel" for d in decoders) or model.get("byte_fallback")):
        return None
    return 2 * max(map(len, tokenizer.get_vocab()), default=1)


class PromptTokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, model_name: str, max_token_chars: int | None = -1) -> None:
        """``max_token_chars``: the tokenizer's ``chars_per_token_bound`` where already known (-1: compute it)."""
        self.tokenizer = tokenizer
        self.model_name = model_name
        # A text longer than n times this cannot fit in n tokens, so it is refused without tokenizing it.
        self.max_token_chars = chars_per_token_bound(tokenizer) if max_token_chars == -1 else max_token_chars

    def copy(self) -> PromptTokenizer:
        """One for another thread: the same tokenizer, not shared (its bound is not parsed out of it again)."""
        return PromptTokenizer(copy.deepcopy(self.tokenizer), self.model_name, self.max_token_chars)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"messages: the target model {self.model_name!r} has no chat template; send a prompt")
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def tokenize(self, kind: str, prompt: str | list[int] | list[dict[str, str]], max_tokens: int | None = None,
                 name: str = "prompt") -> list[int]:  # fmt: skip
        """A prompt's token ids: ``kind`` is "text", "messages" (the chat template) or "token_ids". With ``max_tokens``
        a longer prompt raises ValueError naming ``name``; a text too long to fit is refused before tokenizing."""
        limit = f"{name} must be at most {max_tokens} tokens (limit max_prompt_tokens)"
        if max_tokens is not None and kind != "token_ids" and self.max_token_chars is not None:
            chars = len(prompt) if kind == "text" else sum(len(m["content"]) for m in prompt)
            if chars > max_tokens * self.max_token_chars:
                raise ValueError(f"{limit}, got {chars} characters: more than {max_tokens} tokens of at most "
                                 f"{self.max_token_chars} characters each")  # fmt: skip
        if kind == "text":
            ids = list(self.encode(prompt))
        elif kind == "messages":
            ids = list(self.encode_chat(prompt))
        else:
            ids = list(prompt)
        if max_tokens is not None and len(ids) > max_tokens:
            raise ValueError(f"{limit}, got {len(ids)}")
        return ids
