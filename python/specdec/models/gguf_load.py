"""Load a GGUF file as stored: its quantised tensors become ``QuantLinear``/``QuantEmbedding`` modules directly.

No float copy of the model is made, on disk or in memory: the config and tokenizer come from the cache
(``gguf_convert.ensure_metadata``), the tensor index from the file (``gguf_tensors``), the model is built on the
meta device, and each GGUF tensor is repacked into
the kernel's layout (``quant.from_gguf``, exact) or, for float tensors (norms, biases), copied. A cheaper draft is
requantised (int8 or q4) from the stored values as each tensor is read. A tensor the kernel does not hold (a type
such as Q3_K or IQ4_XS, or a width that is not a multiple of 128) is dequantised to float32, exactly, with a warning
naming it and its type. It serves the
Llama-family files transformers reads (llama, qwen2, mistral: q/k/v/o, gate/up/down, two RMSNorms), undoing
llama.cpp's q/k row order for the ``llama`` architecture.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from gguf.quants import dequantize
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from specdec.models import quant
from specdec.models.gguf_convert import ensure_metadata
from specdec.models.gguf_tensors import read_tensors

_LAYER = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}  # fmt: skip
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_FLOAT = {"F32", "F16", "BF16"}
log = logging.getLogger("specdec.models")


def module_name(tensor: str) -> tuple[str, str]:
    """GGUF tensor name → (transformers module path, parameter): ``blk.3.attn_q.bias`` → (``model.layers.3.self_attn.q_proj``, ``bias``)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", tensor)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}", m.group(3)
    m = re.fullmatch(r"(\w+)\.(weight|bias)", tensor)
    if m and m.group(1) in _TOP:
        return _TOP[m.group(1)], m.group(2)
    raise ValueError(f"GGUF tensor {tensor!r} has no place in a Llama-family model")


def _llama_rows(n: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's q/k permutation for ``heads`` heads (rotary halves interleaved)."""
    return np.arange(n).reshape(heads, n // heads // 2, 2).swapaxes(1, 2).reshape(n)


def _set(model: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, module)


def load_quantised(path: Path, requantize_to: str | None = None) -> tuple[PreTrainedModel, Path]:
    """The GGUF file ``path`` as a CPU model with quantised linear layers and embedding; also the directory
    holding its tokenizer. ``requantize_to`` ("int8" or "q4"): every linear layer (and a tied embedding, which is
    the LM head) in that format instead of as stored; an untied embedding stays as stored."""
    meta = ensure_metadata(path)
    config = AutoConfig.from_pretrained(meta)
    arch, stored = read_tensors(path)
    config.tie_word_embeddings = all(t.name != "output.weight" for t in stored)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    rows: dict[str, np.ndarray] = {}
    if arch == "llama":
        hd = config.hidden_size // config.num_attention_heads
        rows = {"self_attn.q_proj": _llama_rows(config.num_attention_heads * hd, config.num_attention_heads),
                "self_attn.k_proj": _llama_rows(config.num_key_value_heads * hd, config.num_key_value_heads)}  # fmt: skip
    params: dict[str, dict[str, tuple]] = {}
    for t in stored:
        mod, param = module_name(t.name)
        params.setdefault(mod, {})[param] = t
    for mod, entries in params.items():
        order = next((r for suffix, r in rows.items() if mod.endswith(suffix)), None)
        weight, bias = entries.get("weight"), entries.get("bias")
        if bias is not None:
            b = torch.from_numpy(np.array(bias.data, dtype=np.float32))
            bias = b[torch.from_numpy(order)] if order is not None else b
        kind = weight.tensor_type.name
        if kind in _FLOAT and weight.data.ndim == 1:  # a norm
            model.get_submodule(mod).weight = torch.nn.Parameter(torch.from_numpy(np.array(weight.data, dtype=np.float32)), requires_grad=False)
            continue
        requantize = None if mod == "model.embed_tokens" and not config.tie_word_embeddings else requantize_to
        qw, dense = _weight(weight, requantize)
        if requantize and dense is not None and dense.shape[1] % quant.CHUNK == 0:  # a float tensor in the file
            qw, dense = quant.quantize(dense, requantize), None
        if order is not None:
            index = torch.from_numpy(order)
            qw, dense = (qw.rows(index), None) if qw is not None else (None, dense[index])
        if mod == "model.embed_tokens":
            _set(model, mod, quant.QuantEmbedding(qw) if qw is not None else torch.nn.Embedding.from_pretrained(dense, freeze=True))
            if config.tie_word_embeddings:
                _set(model, "lm_head", quant.QuantLinear(qw) if qw is not None else _dense_linear(dense, None))
        else:
            _set(model, mod, quant.QuantLinear(qw, bias) if qw is not None else _dense_linear(dense, bias))
    del stored, params  # unmaps the file
    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=config, device="cpu")
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if missing:
        raise ValueError(f"GGUF file {path} lacks tensors for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    model.eval().requires_grad_(False)
    return model, meta


def _weight(tensor, requantize_to: str | None) -> tuple[quant.QuantWeight | None, torch.Tensor | None]:
    """A 2-D GGUF tensor as a QuantWeight (as stored, or requantised), or as float32 where the kernel does not hold
    it: a float tensor, or a quantised one of a type or width it lacks, dequantised exactly (and said in the log)."""
    kind = tensor.tensor_type.name
    if kind not in _FLOAT:
        try:
            return quant.from_gguf(tensor.name, kind, tensor.data, int(tensor.shape[0]), requantize_to), None
        except quant.UnsupportedTensor as e:
            log.warning("%s; it runs dequantised to float32", e)
        values = dequantize(tensor.data, tensor.tensor_type)
    else:
        values = np.array(tensor.data, dtype=np.float32)
    return None, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(int(tensor.shape[1]), int(tensor.shape[0])))


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    return layer
