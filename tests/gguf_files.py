"""Real GGUF files of tiny random models, written with gguf-py: float32, or with chosen tensors quantised."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import gguf.quants
import numpy as np


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (which transformers undoes when it reads a llama GGUF)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random GGUF blocks of a quantised type, [rows, bytes per row]: random codes and sub-scales, with float16
    scales that keep the weights about the size of a trained model's (|w| of order 0.01, and dmin = 8·d, so the
    mins of Q4_K/Q5_K centre them near zero)."""
    qt = getattr(gguf.GGMLQuantizationType, kind)
    per, size = gguf.GGML_QUANT_SIZES[qt]
    blocks = rng.integers(0, 256, size=(rows * cols // per, size), dtype=np.uint8)
    d = rng.uniform(1e-5, 2e-5, len(blocks)) if kind.endswith("_K") else rng.uniform(1e-4, 2e-4, len(blocks))
    fields = {"Q4_K": [(0, d), (2, 8 * d)], "Q5_K": [(0, d), (2, 8 * d)], "Q6_K": [(size - 2, d)], "Q3_K": [(size - 2, d)]}
    for off, value in fields.get(kind, [(0, d)]):
        blocks[:, off : off + 2] = value.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def _stored(name: str, t: np.ndarray, types: dict[str, str], rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """The tensor as written: float32, or quantised as ``types`` says for the first key its name contains (Q8_0,
    Q4_0, Q5_0 quantised from the values; K-quants random, since gguf-py cannot quantise them)."""
    kind = next((k for key, k in types.items() if key in name), None)
    if kind is None or t.ndim == 1:
        return np.ascontiguousarray(t), {}
    qt = getattr(gguf.GGMLQuantizationType, kind)
    if kind.endswith("_K"):
        data = random_blocks(kind, t.shape[0], t.shape[1], rng)
    else:
        data = gguf.quants.quantize(np.ascontiguousarray(t, dtype=np.float32), qt)
    return data, {"raw_dtype": qt}


def write_gguf(model, tok, path: Path, types: dict[str, str] | None = None) -> None:
    """A real llama GGUF with a byte-level BPE ('gpt2') tokenizer; the file says: no BOS. Tensors are float32, except
    those whose name contains a key of ``types``, stored in that quantised type (e.g. {"ffn_down": "Q4_K"}). A model
    with tied embeddings is written without output.weight, as llama.cpp writes one."""
    types = types or {}
    rng = np.random.default_rng(0)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if not types else gguf.LlamaFileType.MOSTLY_Q8_0)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t == "<eos>" else gguf.TokenType.NORMAL for t in tokens])
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.eos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_add_bos_token(False)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    top = [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")]
    if not cfg.tie_word_embeddings:  # a tied file has no output.weight: the embedding is the head
        top.append(("output.weight", "lm_head.weight"))
    for name, key in top:
        w.add_tensor(name, *_with_options(_stored(name, sd[key], types, rng)))
    names = {
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    }  # fmt: skip
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            name = f"blk.{i}.{gg}.weight"
            w.add_tensor(name, *_with_options(_stored(name, t, types, rng)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()




def _with_options(stored: tuple[np.ndarray, dict]) -> tuple:
    data, options = stored
    return (data,) if not options else (data, None, options["raw_dtype"])
