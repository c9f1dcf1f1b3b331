"""Loading a model: what a user sees on the way."""

from __future__ import annotations

import logging

import pytest
from tiny import llama, save, word_tokenizer
from transformers import AutoTokenizer

from specdec.models.loading import load_model

MISTRAL_WARNING = "incorrect regex pattern"
# transformers only looks for Mistral's regex in tokenizers of more than 100,000 ids (as Qwen2.5's and Llama 3's).
LARGE_VOCAB = 100_001


@pytest.fixture
def transformers_warnings():
    """The messages transformers logs (its loggers do not propagate to pytest's)."""
    messages: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    root = logging.getLogger("transformers")
    root.addHandler(handler)
    yield messages
    root.removeHandler(handler)


def test_a_large_non_mistral_tokenizer_loads_without_the_mistral_regex_warning(tmp_path, transformers_warnings):
    """transformers warns about Mistral's tokenizer regex for any local model saved by its own version; the control,
    a plain AutoTokenizer load of the same directory, shows the warning this test looks for."""
    path = save(llama(LARGE_VOCAB, seed=0, hidden=16, layers=1, tied=True), word_tokenizer(LARGE_VOCAB), tmp_path / "m")
    plain = AutoTokenizer.from_pretrained(path)
    assert any(MISTRAL_WARNING in m for m in transformers_warnings)
    transformers_warnings.clear()
    loaded = load_model(path)
    assert not any(MISTRAL_WARNING in m for m in transformers_warnings)
    text = "w1 w99999 w5"
    assert loaded.tokenizer(text)["input_ids"] == plain(text)["input_ids"] == [1, 99999, 5]
