from __future__ import annotations

import pytest

from tiny import bpe_tokenizer, llama, save, word_tokenizer


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Saved tiny models: {'target', 'draft_same' (identical weights), 'draft_other', 'small_target', 'small_draft'}."""
    root = tmp_path_factory.mktemp("tiny")
    bpe = bpe_tokenizer()
    words = word_tokenizer(12)
    target = llama(len(bpe), seed=1)
    return {
        "target": save(target, bpe, root / "target"),
        "draft_same": save(target, bpe, root / "draft_same"),
        "draft_other": save(llama(len(bpe), seed=2, hidden=32, layers=1), bpe, root / "draft_other"),
        "small_target": save(llama(12, seed=3, hidden=32), words, root / "small_target"),
        "small_draft": save(llama(12, seed=4, hidden=32, layers=1), words, root / "small_draft"),
    }
