"""Model loading: a hub id, a local directory or a ``.gguf`` file, placed on a device in a chosen precision.

On a CPU a GGUF file runs as stored (precision "gguf": ``specdec.models.gguf_load``); with a float dtype it is
dequantised once into a safetensors directory in the cache (``specdec.models.gguf_convert``). Float models can be
quantised at load ("int8", "q4": ``specdec.models.quant``). A draft and a target must share a tokenizer, which
``check_pair`` enforces.
"""

from __future__ import annotations

import ctypes
import gc
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.models import attention
from specdec.models import quant
from specdec.models.gguf_convert import ensure_converted
from specdec.models.gguf_load import load_quantised
from specdec.types import PRECISIONS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Weight-only formats: the linear layers' weights are quantised (``quant.QuantLinear``), the rest runs in the mapped
# dtype. "gguf" keeps a GGUF file's own quantisation; "int8" and "q4" quantise float weights at load.
WEIGHT_ONLY = {"gguf": torch.float32, "int8": torch.bfloat16, "q4": torch.bfloat16}
assert set(PRECISIONS) == {"auto", *DTYPES, *WEIGHT_ONLY}


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} (or a weight-only format {sorted(WEIGHT_ONLY)}), got {name!r}")
    return DTYPES[name]


def default_precision(source: str, device: str = "auto", *, draft: bool = False) -> str:
    """What a model runs in unless told. On a CPU: a GGUF target as stored, a GGUF draft requantised to q4 and a
    float draft quantised to int8. A draft's precision changes only how often its proposals are accepted, and a
    cheaper draft step buys more than the acceptance it loses on the default pair (`specdec bench --draft-dtype`
    compares). On a GPU: float32 for a target, bfloat16 for a draft."""
    if resolve_device(device).type == "cpu":
        if str(source).endswith(".gguf"):
            return "q4" if draft else "gguf"
        return "int8" if draft else "float32"
    return "bfloat16" if draft else "float32"


def precision_name(name: str | torch.dtype) -> str:
    """A dtype or weight-only format as the CLI spells it ("float32", "gguf", ...); ValueError if unknown."""
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


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them): after repacking a GGUF file, quantising a float
    model or fusing linear layers, the intermediates and replaced weights otherwise stay resident (`specdec
    loadtest` reports the server's RSS)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


# transformers 4.57.3+ warns that a local tokenizer saved by those versions may carry the pre-tokenizer regex of some
# Mistral releases ("This will lead to incorrect tokenization"): it checks the version that saved the config, not
# the model, so every model specdec converts got the warning. Only a Mistral-family model can have that regex.
_MISTRAL_TYPES = frozenset({"mistral", "mistral3", "voxtral", "ministral", "pixtral"})


def _tokenizer_kwargs(model: PreTrainedModel) -> dict:
    return {} if model.config.model_type in _MISTRAL_TYPES else {"fix_mistral_regex": False}


def load_model(source: str, *, dtype: str | torch.dtype = "auto", device: str = "auto", draft: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer from a hub id, a directory or a .gguf file.

    dtype is a torch dtype or its name; "gguf" (a GGUF file's quantised tensors as stored, CPU only); "int8" or "q4"
    (float linear layers quantised at load, bfloat16 elsewhere); or "auto" (``default_precision``).
    """
    if dtype == "auto":
        dtype = default_precision(source, device, draft=draft)
    precision = precision_name(dtype)
    weight_only = precision if precision in WEIGHT_ONLY else ""
    gguf_file, cpu = str(source).endswith(".gguf"), resolve_device(device).type == "cpu"
    if weight_only == "gguf" and not (gguf_file and cpu):
        raise ValueError(f"dtype 'gguf' needs a .gguf file on a CPU, got {source!r} on {resolve_device(device)}")
    if weight_only and gguf_file and cpu:  # as stored, or requantised from the stored values: no float copy
        model, path = load_quantised(Path(source), requantize_to=weight_only if weight_only in ("int8", "q4") else None)
    else:
        path = str(ensure_converted(Path(source))) if str(source).endswith(".gguf") else source
        torch_dtype = WEIGHT_ONLY[weight_only] if weight_only else resolve_dtype(dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, low_cpu_mem_usage=True)
        model.to(resolve_device(device)).eval()
        model.requires_grad_(False)
    attention.install(model)
    if weight_only in ("int8", "q4") and not gguf_file:
        quant.quantize_model(model, weight_only)
    if weight_only:
        gc.collect()  # the GGUF reader's cycles hold the file's mapping, whose touched pages count as resident
        return_freed_memory()
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
