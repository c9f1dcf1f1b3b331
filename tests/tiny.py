"""Tiny random-initialised Llama models and tokenizers, built and saved inside the tests.

They go through the same loading code as real models (``specdec.models.loading.load_model`` on a directory).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding keeps the target distribution exactly.",
    "Café crème, naïve façade, jalapeño — über straße.",
    "漢字とかなの文章です。日本語のテキスト。",
    "Emoji: 🚀🔥✨ and math: ∑ ∫ √ π ≈ 3.14159",
    "import numpy as np\nx = np.zeros((3, 4))\n",
] * 4


def bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: some tokens are partial UTF-8 sequences, as in real models."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def word_tokenizer(vocab_size: int = 12) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``vocab_size`` words (id 0 is <eos>), for small-vocabulary statistics."""
    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def llama(
    vocab_size: int, *, seed: int, hidden: int = 64, layers: int = 2, context: int = 512, tied: bool = False
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        eos_token_id=0,
        bos_token_id=None,
        pad_token_id=None,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config)
    # A larger init spreads the logits, so random models have peaked, varied next-token distributions.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.float().eval()


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
