"""Model loading: a hub id, a local directory or a ``.gguf`` file, placed on a device in a chosen dtype.

GGUF files are dequantised once into a safetensors directory in the cache (see ``specdec.models.gguf_convert``); later
loads read that directory. A draft and a target must share a tokenizer, which ``check_pair`` enforces.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.models import attention
from specdec.models import linear
from specdec.models.gguf_convert import ensure_converted

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight-only formats: the linear layers' weights are quantised, everything else runs in the mapped dtype.
WEIGHT_ONLY = {"int8": torch.bfloat16}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_draft_precision(device: str = "auto") -> str:
    """What a draft runs in unless told: int8 on a CPU with AVX-512 VNNI, where the small-M kernel multiplies int8
    rows by int8-quantised activations and the draft is cheapest (compare `specdec bench --draft-dtype int8` and
    `--draft-dtype bfloat16`), bfloat16 elsewhere (without VNNI the int8 kernel is a portable loop, slower than
    bfloat16)."""
    if resolve_device(device).type == "cpu" and linear.int8_is_fast():
        return "int8"
    return "bfloat16"


def precision_name(name: str | torch.dtype) -> str:
    """A dtype or weight-only format as the CLI spells it ("float32", "int8", ...); ValueError if unknown."""
    if isinstance(name, str) and name in WEIGHT_ONLY:
        return name
    return str(resolve_dtype(name)).removeprefix("torch.")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def set_threads(threads: int | None) -> None:
    """CPU intra-op threads; None keeps torch's default (one per core)."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


@dataclass
class LoadedModel:
    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    weight_only: str = ""  # a WEIGHT_ONLY format the linear layers were quantised to, or "" for none

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the activations (and of the weights, unless weight_only is set)."""
        return self.model.dtype

    @property
    def precision(self) -> str:
        return self.weight_only or precision_name(self.dtype)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def vocab_size(self) -> int:
        """Rows of the output embedding (may exceed the tokenizer's size by padding)."""
        return int(self.model.get_output_embeddings().out_features)

    @property
    def context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def _local_source(source: str) -> str:
    if source.endswith(".gguf"):
        return str(ensure_converted(Path(source)))
    return source


def _return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them): after quantising a 0.5B draft, the replaced
    bfloat16 weights otherwise stay resident (the server's RSS, in `specdec loadtest`, shows the difference)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


# transformers 4.57.3+ warns that a local tokenizer saved by those versions may carry the pre-tokenizer regex of some
# Mistral releases ("This will lead to incorrect tokenization"): it checks the version that saved the config, not
# the model, so every model specdec converts got the warning. Only a Mistral-family model can have that regex.
_MISTRAL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def _tokenizer_kwargs(model: PreTrainedModel) -> dict:
    return {} if model.config.model_type in _MISTRAL_TYPES else {"fix_mistral_regex": False}


def load_model(source: str, *, dtype: str | torch.dtype = "float32", device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a directory or a .gguf file.

    dtype is a torch dtype or its name, or "int8": weight-only int8 linear layers (per-row scales) with
    bfloat16 everywhere else, meant for a draft model (``linear.Int8Linear``).
    """
    precision = precision_name(dtype)
    weight_only = precision if precision in WEIGHT_ONLY else ""
    path = _local_source(source)
    torch_dtype = WEIGHT_ONLY[weight_only] if weight_only else resolve_dtype(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, low_cpu_mem_usage=True)
    model.to(resolve_device(device)).eval()
    model.requires_grad_(False)
    attention.install(model)
    if weight_only:
        linear.quantize_int8(model)
        _return_freed_memory()
    tokenizer = AutoTokenizer.from_pretrained(path, **_tokenizer_kwargs(model))
    return LoadedModel(name=source, model=model, tokenizer=tokenizer, weight_only=weight_only)


def check_pair(target: LoadedModel, draft: LoadedModel) -> None:
    """Raise ValueError unless both tokenizers map every id they share to the same token."""
    t_vocab = {i: tok for tok, i in target.tokenizer.get_vocab().items()}
    d_vocab = {i: tok for tok, i in draft.tokenizer.get_vocab().items()}
    shared = t_vocab.keys() & d_vocab.keys()
    bad = sorted(i for i in shared if t_vocab[i] != d_vocab[i])
    if bad or not shared:
        example = f"; e.g. id {bad[0]} is {t_vocab[bad[0]]!r} vs {d_vocab[bad[0]]!r}" if bad else ""
        raise ValueError(
            f"draft model {draft.name!r} and target model {target.name!r} do not share a tokenizer: "
            f"{len(bad)} of {len(shared)} shared ids differ{example}"
        )
