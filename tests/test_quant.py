"""Quantised weights: GGUF blocks repacked exactly, the kernel on every path this CPU runs, and GGUF files loaded as
stored (specdec.models.quant, specdec.models.gguf_load)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import gguf
import gguf.quants
import numpy as np
import pytest
import torch

from gguf_files import random_blocks, write_gguf
from specdec import _kernels, torch_env
from specdec.models import isa, quant
from specdec.models.gguf_tensors import read_tensors
from specdec.engine import Engine, EngineConfig
from specdec.models.loading import load_model
from specdec.types import GenerationRequest, Method, SpeculationParams
from tiny import bpe_tokenizer, llama

PATHS = isa.supported()  # every path this CPU runs; SPECDEC_ISA forces the default one


@pytest.mark.parametrize("kind", sorted(quant.GGUF_TYPES))
def test_gguf_blocks_repack_to_the_same_values(kind):
    raw = random_blocks(kind, 5, 512, np.random.default_rng(1))
    expected = gguf.quants.dequantize(raw, getattr(gguf.GGMLQuantizationType, kind)).reshape(5, 512)
    w = quant.from_gguf("blk.0.ffn_up.weight", kind, raw, 512)
    assert (w.bits, w.group) == quant.GGUF_TYPES[kind][:2]
    assert np.array_equal(w.dequantize().numpy(), expected)


def test_every_float16_scale_converts_exactly():
    """Scales of every class a float16 has (subnormal, negative, largest, zero) reach float32 unchanged."""
    halves = [0x0001, 0x03FF, 0x8001, 0x0400, 0x7BFF, 0xFBFF, 0x0000, 0x8000, 0x3C00, 0x3555, 0xB4CD, 0x1234]
    raw = random_blocks("Q8_0", len(halves), 32, np.random.default_rng(2))
    raw[:, :2] = np.array(halves, dtype=np.uint16).view(np.uint8).reshape(-1, 2)
    expected = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0).reshape(len(halves), 32)
    raw4 = np.repeat(raw, 4, axis=0).reshape(len(halves), 4 * 34)  # each block four times: the kernel's 128 columns
    w = quant.from_gguf("t", "Q8_0", raw4, 128)
    assert np.array_equal(w.dequantize().numpy(), np.tile(expected, 4))
    assert np.array_equal(w.scales[:, 0].numpy(), np.array(halves, dtype=np.uint16).view(np.float16).astype(np.float32))


def test_an_unsupported_type_or_width_names_the_tensor():
    with pytest.raises(quant.UnsupportedTensor, match=r"'blk\.3\.attn_q\.weight' has type Q3_K"):
        quant.from_gguf("blk.3.attn_q.weight", "Q3_K", np.zeros((2, 110), np.uint8), 256)
    with pytest.raises(quant.UnsupportedTensor, match=r"'output\.weight' has 96 columns, not a multiple of 128"):
        quant.from_gguf("output.weight", "Q8_0", np.zeros((2, 102), np.uint8), 96)
    with pytest.raises(ValueError, match=r"'output\.weight': Q8_0 rows of 128 columns take 136 bytes"):
        quant.from_gguf("output.weight", "Q8_0", np.zeros((2, 102), np.uint8), 128)


def layouts() -> dict[str, quant.QuantWeight]:
    """One weight per kernel layout: 4-bit with mins, 8-bit in groups of 32 and of 16, with two-level scales or not."""
    rng = np.random.default_rng(2)
    return {
        "Q4_K": quant.from_gguf("a", "Q4_K", random_blocks("Q4_K", 40, 768, rng), 768),
        "Q5_K": quant.from_gguf("d", "Q5_K", random_blocks("Q5_K", 40, 768, rng), 768),
        "Q8_0": quant.from_gguf("b", "Q8_0", random_blocks("Q8_0", 40, 768, rng), 768),
        "Q6_K": quant.from_gguf("c", "Q6_K", random_blocks("Q6_K", 40, 768, rng), 768),
        "q4": quant.quantize(torch.randn(40, 768), "q4"),
    }


def activation_reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x · w^T with x quantised as the kernel does (int8 per 128 columns), in float64; and the bound on its distance
    from the unquantised product: each activation moves by at most half its chunk's step."""
    chunks = x.double().view(x.shape[0], -1, quant.CHUNK)
    step = (chunks.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-30)
    xq = (torch.round(chunks / step).clamp(-127, 127) * step).view_as(x)
    bound = (step / 2).expand_as(chunks).reshape_as(x) @ w.double().abs().T
    return xq @ w.double().T, bound


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["Q4_K", "Q5_K", "Q8_0", "Q6_K", "q4"])
def test_kernel_equals_the_quantised_activation_reference(path, layout):
    w = layouts()[layout]
    dense = w.dequantize()
    x = torch.randn(5, 768, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(40)
    y = quant.linear(x, w, bias, isa=path).double()
    ref, bound = activation_reference(x, dense)
    scale = (x.double().abs() @ dense.double().abs().T).max()
    assert (y - bias.double() - ref).abs().max() <= 1e-5 * scale  # float32 rounding only
    assert ((y - bias.double() - x.double() @ dense.double().T).abs() <= bound + 1e-5 * scale).all()
    # The control: a weight whose scales are off by 1% is caught by the same check.
    wrong = dataclasses.replace(w, scales=w.scales * 1.01)
    assert (quant.linear(x, wrong, bias, isa=path).double() - bias.double() - ref).abs().max() > 1e-5 * scale


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["Q4_K", "Q5_K", "Q6_K"])
def test_two_level_scales_give_the_bits_of_the_same_scales_per_group(path, layout):
    """The K-quants stream an int8 sub-scale per group and a float per 256 weights; the kernel must give exactly
    what the same values give as one float32 scale (and min) per group, in fewer bytes."""
    w = layouts()[layout]
    scales, mins = w.group_scales()
    flat = dataclasses.replace(w, scales=scales, mins=mins, sub_scales=None, sub_mins=None)
    assert w.block == 256 and flat.block == w.group and w.nbytes < flat.nbytes
    x = torch.randn(9, 768, generator=torch.Generator().manual_seed(7))
    assert torch.equal(quant.linear(x, w, isa=path), quant.linear(x, flat, isa=path))
    # The control: one sub-scale one step off changes the output.
    sub = w.sub_scales.clone()
    sub[3, 0] += -1 if sub[3, 0] > 0 else 1
    assert not torch.equal(quant.linear(x, dataclasses.replace(w, sub_scales=sub), isa=path), quant.linear(x, flat, isa=path))


@pytest.mark.parametrize("path", PATHS)
def test_kernel_rows_are_bit_identical_for_1_to_32_rows(path):
    x = torch.randn(32, 768, generator=torch.Generator().manual_seed(4))
    for name, w in layouts().items():
        full = quant.linear(x, w, isa=path)
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 31]:
            assert torch.equal(quant.linear(x[:m], w, isa=path), full[:m]), (name, path, m)
        assert torch.equal(quant.linear(x[9:10], w, isa=path), full[9:10]), (name, path)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("layout", ["Q4_K", "Q5_K", "Q8_0", "Q6_K", "q4"])
def test_the_gemm_path_dequantises_exactly_and_multiplies_within_its_rounding(layout, path, monkeypatch):
    """Bound.gemm, on every path (each picks its GEMM's dtype): each tile dequantised in C++ holds the weight's values
    exactly (rounded to nearest even where the GEMM runs in bfloat16), and each block's product stays within that
    dtype's rounding of x and w, whatever the other blocks; the control, a weight with one scale changed, does not."""
    monkeypatch.setattr(isa, "ISA", path)
    w = layouts()[layout]
    dtype = quant.gemm_dtype()
    bound = quant.Bound(w, torch.randn(40))
    out = torch.empty(40, 768, dtype=dtype)
    _kernels.dequantize_rows(*bound._weight_args, 40, 768, 0, 40, out.data_ptr(), dtype == torch.bfloat16)
    assert torch.equal(out, w.dequantize().to(dtype))
    x = torch.randn(70, 768, generator=torch.Generator().manual_seed(8))
    exact = x.double() @ w.dequantize().double().t() + bound.bias.double()
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-23  # relative rounding of inputs and output
    bound_err = 3 * eps * (x.double().abs() @ w.dequantize().double().abs().t()) + 1e-6
    blocks = [(0, 64), (64, 70)]
    y = torch.full((70, 40), float("nan"))
    bound.gemm(x, blocks, y)
    assert ((y.double() - exact).abs() <= bound_err).all()
    y_alone = torch.full((70, 40), float("nan"))
    bound.gemm(x, blocks[1:], y_alone)  # a block's bits do not depend on the other blocks; rows outside stay as they were
    assert torch.equal(y_alone[64:], y[64:]) and y_alone[:64].isnan().all()
    scales = w.scales.clone()
    scales[5] *= 1.5
    wrong = quant.Bound(dataclasses.replace(w, scales=scales), bound.bias)
    wrong.gemm(x, blocks, y)
    assert not ((y.double() - exact).abs() <= bound_err).all()


def test_a_forced_path_the_cpu_lacks_is_refused():
    assert isa.resolve("portable") == "portable"
    with pytest.raises(ValueError, match=r"SPECDEC_ISA must be auto or one of \[.*\] on this CPU, got 'sse9'"):
        isa.resolve("sse9")


@pytest.mark.parametrize("kind", ["Q8_0", "Q6_K", "Q4_K"])
def test_requantised_gguf_weights_equal_quantising_their_values_and_stay_close(kind):
    """Requantising a GGUF tensor as it is read gives the bits of quantising its dequantised values; 4 bits over
    each group's range stay within half a step (range / 30) of the stored value."""
    raw = random_blocks(kind, 40, 768, np.random.default_rng(6))
    stored = quant.from_gguf("t", kind, raw, 768)
    q4 = quant.from_gguf("t", kind, raw, 768, requantize_to="q4")
    assert q4.layout() == (4, 32, 32, True) and q4.shape == stored.shape
    assert torch.equal(q4.dequantize(), quant.quantize(stored.dequantize(), "q4").dequantize())
    assert torch.equal(quant.from_gguf("t", kind, raw, 768, "int8").codes, quant.quantize(stored.dequantize(), "int8").codes)
    groups = stored.dequantize().view(40, -1, 32)
    half_step = (groups.amax(-1) - groups.amin(-1)) / 30
    assert ((q4.dequantize().view(40, -1, 32) - groups).abs() <= half_step[..., None] * 1.001 + 1e-7).all()


def test_quantised_weights_stack():
    w, q4 = layouts()["Q8_0"], layouts()["q4"]
    both = quant.stack([w.rows(slice(0, 10)), w.rows(slice(10, 40))])
    assert torch.equal(both.dequantize(), w.dequantize())
    with pytest.raises(ValueError, match="cannot stack quantised weights of different layouts"):
        quant.stack([w, q4])


# ---- GGUF files loaded as stored ------------------------------------------------------------------------

TYPES = {"attn_q": "Q4_K", "attn_k": "Q5_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
         "ffn_up": "Q5_0", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output.weight": "Q6_K"}  # fmt: skip


@pytest.fixture(scope="module")
def quant_gguf(tmp_path_factory):
    tok = bpe_tokenizer()
    model = llama(len(tok), seed=5, hidden=256)
    path = tmp_path_factory.mktemp("gguf") / "tiny-quant.gguf"
    write_gguf(model, tok, path, TYPES)
    return path, tok


def test_a_gguf_file_loads_as_stored_and_matches_its_dequantised_model(quant_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path, tok = quant_gguf
    stored = load_model(str(path), dtype="auto", device="cpu")
    assert stored.precision == "gguf"
    kinds = {n: m.kind for n, m in stored.model.named_modules() if isinstance(m, quant.QuantLinear)}
    assert kinds["model.layers.0.self_attn.k_proj"] == "Q5_K" and kinds["lm_head"] == "Q6_K"
    assert isinstance(stored.model.get_input_embeddings(), quant.QuantEmbedding)
    assert not (tmp_path / "cache" / "converted").exists()  # no float copy on disk
    dense = load_model(str(path), dtype="float32", device="cpu")  # transformers' dequantisation, via safetensors
    ids = torch.tensor([tok.encode("def add(a, b): return a + b")])
    with torch.no_grad():
        a, b = stored.model(ids).logits, dense.model(ids).logits
    # Same weights (the llama q/k row order undone alike); only the kernel's int8 activations differ.
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9
    for name, m in stored.model.named_modules():
        if isinstance(m, quant.QuantLinear):
            assert torch.equal(m.weight_q.dequantize(), dense.model.get_submodule(name).weight), name


def test_a_type_the_kernel_lacks_runs_dequantised_with_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    tok = bpe_tokenizer()
    model = llama(len(tok), seed=6, hidden=256)
    path = tmp_path / "tiny-q3.gguf"
    write_gguf(model, tok, path, {"ffn_down": "Q6_K", "ffn_up": "Q3_K"})
    with caplog.at_level("WARNING", logger="specdec.models"):
        loaded = load_model(str(path), dtype="gguf", device="cpu")
    assert "'blk.0.ffn_up.weight' has type Q3_K" in caplog.text and "dequantised to float32" in caplog.text
    assert isinstance(loaded.model.model.layers[0].mlp.up_proj, torch.nn.Linear)
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj, quant.QuantLinear)


def test_a_tied_quantised_embedding_stays_tied_when_requantised(tmp_path, monkeypatch):
    """A tied GGUF file loaded as q4 (a cheaper draft) holds one table: the embedding looks its rows up in the
    requantised head, not in a second copy of the stored one. As stored, both share the stored table."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    tok = bpe_tokenizer()
    path = tmp_path / "tiny-tied.gguf"
    write_gguf(llama(len(tok), seed=7, hidden=256, tied=True), tok, path, {"token_embd": "Q8_0", "ffn": "Q4_K"})
    for dtype, kind in [("gguf", "Q8_0"), ("q4", "q4")]:
        model = load_model(str(path), dtype=dtype, device="cpu", draft=True).model
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        assert isinstance(embedding, quant.QuantEmbedding) and embedding.kind == head.kind == kind, dtype
        assert embedding.codes is head.codes, dtype
        ids = torch.tensor([3, 17, 42])
        assert torch.equal(embedding(ids), head.weight_q.dequantize(ids)), dtype
    untied = llama(len(tok), seed=7, hidden=256)  # control: a file with its own head keeps two tables
    write_gguf(untied, tok, tmp_path / "untied.gguf", {"token_embd": "Q8_0", "output.weight": "Q8_0"})
    model = load_model(str(tmp_path / "untied.gguf"), dtype="q4", device="cpu", draft=True).model
    assert model.get_input_embeddings().kind == "Q8_0" and model.get_output_embeddings().kind == "q4"


@pytest.mark.parametrize("draft_vocab", [0, 100])
def test_greedy_speculation_on_a_gguf_pair_equals_target_only(quant_gguf, tmp_path, monkeypatch, draft_vocab):
    """The quantised target as stored, a q4 draft requantised from the same file (with the draft's head cut to 100
    ids or not): speculative output equals target-only output token for token, at every γ."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path, tok = quant_gguf
    target = load_model(str(path), device="cpu")
    draft = load_model(str(path), dtype="q4", device="cpu", draft=True)
    assert draft.precision == "q4" and isinstance(draft.model.lm_head, quant.QuantLinear)
    engine = Engine(target, draft, EngineConfig(method=Method.DRAFT, draft_vocab=draft_vocab))
    for i, text in enumerate(["def add(a, b):", "Café 🚀 and the rest", "for i in range(10): print(i)"]):
        ids = tok.encode(text)
        base = generate(engine, ids, 20, method=Method.NONE)
        for gamma in (1, 3, 8):
            assert generate(engine, ids, 20, method=Method.DRAFT, gamma=gamma) == base, (i, gamma)


def generate(engine: Engine, ids: list[int], n: int, **spec) -> list[int]:
    seq = engine.start(GenerationRequest(prompt_ids=ids, max_new_tokens=n, ignore_eos=True, speculation=SpeculationParams(**spec)))
    while not seq.finished:
        engine.step_batch([seq])
    return seq.output_ids


def test_a_request_in_a_batch_gets_the_tokens_it_gets_alone(quant_gguf, tmp_path, monkeypatch):
    """int8 activations turn the smallest difference into another token, so every sequence's bits must not depend on
    its neighbours: different prompt lengths (padding), packed prefills, verifies beside decode steps."""
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path / "cache"))
    path, tok = quant_gguf
    engine = Engine(load_model(str(path)), load_model(str(path), dtype="q4", draft=True), EngineConfig(method=Method.DRAFT))
    prompts = [tok.encode(t) for t in ["def add(a, b):", "Café 🚀 and the rest of it, " * 3, "x"]]
    for method in (Method.NONE, Method.DRAFT):
        alone = [generate(engine, ids, 16, method=method) for ids in prompts]
        seqs = [engine.start(GenerationRequest(prompt_ids=ids, max_new_tokens=16, ignore_eos=True,
                                               speculation=SpeculationParams(method=method))) for ids in prompts]  # fmt: skip
        while any(not s.finished for s in seqs):
            engine.step_batch([s for s in seqs if not s.finished])
        assert [s.output_ids for s in seqs] == alone, method


def test_the_tensor_index_matches_gguf_py(quant_gguf):
    """gguf_tensors walks past the metadata values; what it finds must be gguf-py's reader's tensors exactly."""
    path, _ = quant_gguf
    arch, tensors = read_tensors(path)
    reference = gguf.GGUFReader(path)
    assert arch == "llama" and len(tensors) == len(reference.tensors)
    for mine, theirs in zip(tensors, reference.tensors):
        assert (mine.name, mine.tensor_type, mine.shape) == (theirs.name, theirs.tensor_type, tuple(int(x) for x in theirs.shape))
        assert mine.data.shape == theirs.data.shape and np.array_equal(mine.data, theirs.data)
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_tensors(Path(__file__))


def _reference_quantize(w: torch.Tensor, kind: str, rounding=torch.round) -> torch.Tensor:
    """The values quantize(w, kind) must hold, by its docstring's formulas in torch."""
    g = w.view(w.shape[0], -1, 32)
    if kind == "int8":
        s = g.abs().amax(-1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))
        return (rounding(g / s).clamp(-127, 127) * s).view_as(w)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s = (hi - lo) / 15
    s = torch.where(s > 0, s, torch.ones_like(s))
    return (rounding((g - lo) / s).clamp(0, 15) * s - (-lo)).view_as(w)


@pytest.mark.parametrize("kind", ["int8", "q4"])
def test_quantize_holds_the_formulas_values_with_ties_to_even(kind):
    """Float weights quantised in C++ hold exactly the values of the documented formulas (torch.round: ties to even),
    including groups that are all zero and groups whose values fall exactly halfway between two codes; the control
    rounds ties away from zero and must differ."""
    w = torch.randn(70, 384, generator=torch.Generator().manual_seed(3)) * 0.02
    w[5, :32] = 0.0
    ties = torch.arange(32, dtype=torch.float32) % 16  # group range 0..15 or ±15: a step of exactly 1 (q4) ...
    w[6, :32] = ties + 0.5 * (torch.arange(32) % 2 == 0) * (ties < 15)  # ... and codes exactly halfway
    w[7, :32] = torch.linspace(-127, 127, 32).round() + 0.5 * (torch.arange(32) % 3 == 0)  # int8: step 1, halves
    w[7, 0] = 127.0
    q = quant.quantize(w, kind)
    assert torch.equal(q.dequantize(), _reference_quantize(w, kind))
    away = lambda t: torch.sign(t) * torch.floor(t.abs() + 0.5)  # noqa: E731
    assert not torch.equal(q.dequantize(), _reference_quantize(w, kind, away))


@pytest.mark.parametrize("forced, capability", [("avx2", "AVX2"), ("", None)])
def test_a_forced_avx2_path_holds_torchs_own_kernels_to_avx2(forced, capability):
    """torch_env.prepare under SPECDEC_ISA=avx2 caps ATen (and oneDNN, MKL) at AVX2 before torch loads; without it
    (the control) torch keeps the capability it detects."""
    code = "from specdec import torch_env; torch_env.prepare(); import torch; print(torch.backends.cpu.get_cpu_capability())"
    env = {k: v for k, v in os.environ.items() if k not in torch_env.AVX2_CAPS} | {"SPECDEC_ISA": forced}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip()
    if capability is None:
        assert out == torch.backends.cpu.get_cpu_capability()
    else:
        assert out == capability
