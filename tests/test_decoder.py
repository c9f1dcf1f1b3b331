"""The lean forward computes transformers' function: over ragged rows with their own caches, after
rollbacks, for Llama (no biases, tied or not) and Qwen2 (q/k/v biases), in float32 and quantised."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import bpe_tokenizer, llama
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

from specdec.kernels import sampling
from specdec.models import decoder as lean, isa, ragged
from specdec.models import linear as fast_linear
from specdec.models import quant
from specdec.models.decoder import Decoder

VOCAB = 50


def qwen2(seed: int, hidden: int = 64) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)  # fmt: skip
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():  # random biases: transformers initialises them to zero, which would hide a misplaced one
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


MODELS = {
    "llama": lambda: llama(VOCAB, seed=5),
    "llama-tied": lambda: llama(VOCAB, seed=6, tied=True),
    "qwen2": lambda: qwen2(7),
}


def reference(model, ids: list[int]) -> torch.Tensor:
    """transformers' next-token logits at every position of ids, without a cache: [len(ids), V]."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def run_ragged_script(model, decoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Prefill two prompts of different lengths, then ragged steps with a rollback; pair each logits row the
    decoder returned with transformers' logits for the same position."""
    g = torch.Generator().manual_seed(0)
    # 45 rows in the first forward: past the kernel's row limits (the int8 slices, the float GEMM).
    seqs = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 40)]
    caches: list = [None, None]
    cached = [0, 0]
    pairs = []

    def step(new: list[list[int]], want: list[list[int]]) -> None:
        rows = [ragged.Row(caches[i], cached[i], new[i], want[i]) for i in range(2)]
        with torch.inference_mode():
            out_caches, logits = decoder.forward(rows, VOCAB)
        for i in range(2):
            full = seqs[i][: cached[i]] + new[i]
            ref = reference(model, full)
            pairs.extend((logits[i][j], ref[cached[i] + w]) for j, w in enumerate(want[i]))
            seqs[i], caches[i], cached[i] = full, out_caches[i], len(full)

    step([seqs[0], seqs[1]], [[4], [0, 39]])  # both prompts at once, one wanting two positions
    step([[1, 2, 3], [4]], [[0, 1, 2], [0]])  # a verify-like row beside a decode row
    cached[0] -= 2  # roll back the last two tokens of the first row, as a rejected draft does
    seqs[0] = seqs[0][: cached[0]]
    step([[7, 8], [9]], [[1], [0]])
    step([[10], [11]], [[0], [0]])
    return pairs


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_lean_forward_matches_transformers_over_ragged_rows_and_rollbacks(name):
    model = MODELS[name]()
    assert_matches(run_ragged_script(model, Decoder(model)))


def assert_matches(pairs) -> None:
    assert len(pairs) == 11
    for got, want in pairs:
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_the_comparison_rejects_a_forward_without_positions(monkeypatch):
    """Negative control: the same script with rotary positions left out disagrees with transformers."""
    model = MODELS["llama"]()
    monkeypatch.setattr(lean, "_rope", lambda *args: None)
    with pytest.raises(AssertionError):
        assert_matches(run_ragged_script(model, Decoder(model)))


def test_quantised_fusion_keeps_the_models_own_forward_bit_for_bit_and_holds_no_copy():
    model = qwen2(8, hidden=128)  # the quantised kernel takes widths in multiples of 128
    assert quant.quantize_model(model, "int8") == 2 * 7 + 1
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.inference_mode():
        before = model(ids).logits
    decoder = Decoder(model)
    with torch.inference_mode():
        after = model(ids).logits
    assert torch.equal(before, after)
    attn = model.model.layers[0].self_attn
    fused = decoder.layers[0].qkv.weight
    assert attn.q_proj.codes.untyped_storage().data_ptr() == fused.codes.untyped_storage().data_ptr()
    assert attn.v_proj.scales.untyped_storage().data_ptr() == fused.scales.untyped_storage().data_ptr()


@pytest.mark.parametrize("precision", ["int8", "q4", "bfloat16"])
def test_a_low_precision_lean_forward_agrees_with_the_model(precision):
    """Quantised or bfloat16 weights: the lean forward keeps float32 activations where the model's own forward keeps
    bfloat16 ones, so the two differ by rounding only: close logits, the same argmax almost everywhere."""
    model = qwen2(9, hidden=128).to(torch.bfloat16)
    if precision in ("int8", "q4"):
        quant.quantize_model(model, precision)
    else:
        fast_linear.install(model)  # the kernel reads bfloat16 weights directly, as the engine sets it up
    decoder = Decoder(model)
    pairs = run_ragged_script(model, decoder)
    got, want = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_an_unsupported_architecture_is_refused_by_name():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)).eval()
    assert not lean.supports(model)
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        Decoder(model)


def test_a_row_claiming_more_cached_tokens_than_its_cache_holds_is_refused():
    model = MODELS["llama"]()
    decoder = Decoder(model)
    with torch.inference_mode():
        caches, _ = decoder.forward([ragged.Row(None, 0, [1, 2, 3], [2])], VOCAB)
        with pytest.raises(ValueError, match="claims 5 cached tokens but its cache holds 3"):
            decoder.forward([ragged.Row(caches[0], 5, [4], [0])], VOCAB)


def test_the_cache_grows_past_its_first_capacity_and_keeps_what_it_held():
    cache = lean.KVCache(layers=1, kv_heads=1, head_dim=2, capacity=4)
    cache.keys[0, 0, :3] = torch.tensor([[1.0, 2], [3, 4], [5, 6]])
    cache.length = 3
    cache.reserve(9)
    assert cache.keys.shape[2] == 16
    assert torch.equal(cache.keys[0, 0, :3], torch.tensor([[1.0, 2], [3, 4], [5, 6]]))


@pytest.mark.parametrize("temperature", [0.05, 0.7, 1.0])
def test_a_reduced_vocabulary_keeps_its_logits_and_gives_the_rest_no_probability(temperature):
    """Past three of the sampling kernels' 4096-id chunks, so whole chunks hold only excluded ids (whose logit must
    stay finite once divided by the temperature, or a chunk's sum turns NaN and every draft is rejected)."""
    model = llama(12000, seed=11)
    vocab = torch.arange(0, 3000)
    row = lambda: ragged.Row(None, 0, [1, 2, 3], [2])  # noqa: E731
    _, [cut] = Decoder(model, vocab).forward([row()], 12000)
    _, [full] = Decoder(model).forward([row()], 12000)
    assert torch.equal(cut[0, :3000], full[0, :3000])  # the same head rows, the same bits
    assert (cut[0, 3000:] == lean.EXCLUDED_LOGIT).all()
    tokens, probs = sampling.sample(cut.numpy(), temperature=temperature, seed=3, return_probs=True)
    assert np.isfinite(probs).all() and probs[0, 3000:].sum() < 1e-30 and abs(probs[0].sum() - 1) < 1e-4
    assert tokens[0] < 3000


def test_frequent_ids_keep_the_lowest_ids_and_every_special_token():
    tok = bpe_tokenizer()
    ids = lean.frequent_ids(tok, 10).tolist()
    assert ids == sorted(set(range(10)) | set(tok.all_special_ids))


def verify_and_steps(decoder, prompt: list[int], drafts: list[int], shift: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one verify over ``drafts`` (beside a decode row of another sequence) and of the same tokens fed one
    step at a time; ``shift`` moves the verify's cached length (a control)."""
    with torch.inference_mode():
        caches, _ = decoder.forward([ragged.Row(None, 0, prompt, [0]), ragged.Row(None, 0, prompt[:7], [0])], VOCAB)
        n = len(prompt)
        rows = [ragged.Row(caches[0], n - shift, drafts, list(range(len(drafts)))), ragged.Row(caches[1], 7, [3], [0])]
        _, [verify, _] = decoder.forward(rows, VOCAB)
        steps = []
        for i, t in enumerate(drafts):
            _, [one] = decoder.forward([ragged.Row(caches[0], n + i, [t], [0])], VOCAB)
            steps.append(one[0])
    return verify, torch.stack(steps)


@pytest.mark.parametrize("precision", ["int8", "q4"])
def test_a_verify_equals_decode_steps_bit_for_bit(precision):
    """The target's exactness rests on this: k tokens verified in one forward, beside another sequence, give the
    bits that k one-token steps give, so speculative output equals target-only output."""
    model = qwen2(10, hidden=128)
    quant.quantize_model(model, precision)
    decoder = Decoder(model)
    prompt = list(range(3, 43))
    verify, steps = verify_and_steps(decoder, prompt, [5, 9, 2, 7, 1])
    assert torch.equal(verify, steps)
    verify, steps = verify_and_steps(decoder, prompt, [5, 9, 2, 7, 1], shift=1)  # control: one cached key short
    assert not torch.equal(verify, steps)


@pytest.mark.parametrize("path", isa.supported())
@pytest.mark.parametrize("precision", ["int8", "q4"])
def test_a_prompt_row_takes_the_gemm_and_its_batch_changes_no_rows_bits(precision, path, monkeypatch):
    """A row's whole aligned blocks of GEMM_ROWS new positions (a prompt chunk's) run the quantised linears through
    a GEMM each, its other positions through the kernel, whatever the row is batched with: each row's logits equal
    its logits alone, bit for bit, and
    the prompt's agree with the model's float64 forward, on every path (each picks its GEMM's dtype). The control: the
    same prompt one token short of GEMM_ROWS runs through the kernel and gives other bits."""
    monkeypatch.setattr(isa, "ISA", path)
    model, exact = qwen2(11, hidden=128), qwen2(11, hidden=128).double()
    quant.quantize_model(model, precision)
    with torch.no_grad():  # exact: the same model over the quantised weights' values, in float64
        quantised = dict(model.named_modules())
        for name, module in exact.named_modules():
            if isinstance(quantised[name], (quant.QuantLinear, quant.QuantEmbedding)):
                module.weight.copy_(quantised[name].weight_q.dequantize())
    decoder = Decoder(model)
    long = [int(t) for t in torch.randint(3, VOCAB, (quant.GEMM_ROWS + 6,), generator=torch.Generator().manual_seed(2))]
    wants = list(range(0, len(long), 7))
    with torch.inference_mode():
        _, [alone] = decoder.forward([ragged.Row(None, 0, long, wants)], VOCAB)
        cache, _ = decoder.forward([ragged.Row(None, 0, long[:9], [0])], VOCAB)
        _, [short_alone] = decoder.forward([ragged.Row(cache[0], 9, long[9:12], [0, 1, 2])], VOCAB)
        cache, _ = decoder.forward([ragged.Row(None, 0, long[:9], [0])], VOCAB)
        _, [together, short_together] = decoder.forward(
            [ragged.Row(None, 0, long, wants), ragged.Row(cache[0], 9, long[9:12], [0, 1, 2])], VOCAB)  # fmt: skip
        exact_logits = exact(torch.tensor([long])).logits[0, wants].float()
        _, [kernel_only] = decoder.forward([ragged.Row(None, 0, long[: quant.GEMM_ROWS - 1], [quant.GEMM_ROWS - 2])], VOCAB)
        _, [gemm] = decoder.forward([ragged.Row(None, 0, long[: quant.GEMM_ROWS], [quant.GEMM_ROWS - 2])], VOCAB)
    assert torch.equal(together, alone) and torch.equal(short_together, short_alone)
    assert (alone - exact_logits).abs().max() < 0.03 * exact_logits.abs().max()
    # The causal prefix of one more token does not change position GEMM_ROWS − 2's logits, but the path does.
    assert not torch.equal(kernel_only, gemm)


@pytest.mark.parametrize("precision", ["float", "q4"])
def test_a_prompts_bits_do_not_depend_on_where_its_chunks_begin_at_block_boundaries(precision):
    """What a cached prefix relies on: a prompt prefilled in one forward, or in chunks that begin at multiples of
    GEMM_ROWS (as a prefix cache's hit and the chunked prefill make them), gives the same keys, values and logits
    bit for bit. The control: a chunk beginning inside a block computes that block's positions otherwise."""
    model = qwen2(13, hidden=128)
    if precision != "float":
        quant.quantize_model(model, precision)
    decoder = Decoder(model)
    size = quant.GEMM_ROWS
    prompt = [int(t) for t in torch.randint(3, VOCAB, (3 * size + 9,), generator=torch.Generator().manual_seed(4))]

    def chunked(bounds: list[int]) -> tuple[lean.KVCache, torch.Tensor]:
        cache, cuts = None, [0, *bounds, len(prompt)]
        with torch.inference_mode():
            for a, b in zip(cuts, cuts[1:]):
                [cache], [logits] = decoder.forward([ragged.Row(cache, a, prompt[a:b], [b - a - 1])], VOCAB)
        return cache, logits

    whole_cache, whole = chunked([])
    for bounds in ([size], [2 * size], [size, 3 * size]):
        cache, logits = chunked(bounds)
        assert torch.equal(logits, whole), bounds
        assert torch.equal(cache.keys[:, :, : len(prompt)], whole_cache.keys[:, :, : len(prompt)]), bounds
    _, off_block = chunked([size + 5])
    assert not torch.equal(off_block, whole)


def test_the_pointwise_kernels_match_torch_and_keep_each_rows_bits():
    """RMSNorm and SwiGLU's gate in C++ (csrc/decoder/pointwise.cpp): torch's values, finite at extreme gates, and a
    row's bits do not depend on the rows beside it. The control: a wrong epsilon is caught."""
    g = torch.Generator().manual_seed(3)
    gate_up = torch.randn(5, 2 * 70, generator=g) * 4  # 70: a vector tail
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, -1e30, 0.0])
    got = lean._silu_mul(gate_up)
    torch.testing.assert_close(got, F.silu(gate_up[:, :70]) * gate_up[:, 70:], rtol=1e-6, atol=1e-6)
    assert torch.isfinite(got).all()
    assert all(torch.equal(lean._silu_mul(gate_up[r : r + 1])[0], got[r]) for r in range(5))
    decoder = Decoder(MODELS["llama"]())
    x, w = torch.randn(5, 300, generator=g), torch.randn(300, generator=g)
    want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + decoder.eps) * w
    normed = decoder._rms(x, w)
    torch.testing.assert_close(normed, want, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(decoder._rms(x[r : r + 1], w)[0], normed[r]) for r in range(5))
    decoder.eps = 1.0
    assert not torch.allclose(decoder._rms(x, w), want, rtol=1e-5, atol=1e-6)


def test_a_cpu_without_a_kernel_path_keeps_transformers_forward(monkeypatch):
    """No AVX2 or AVX-512 (an ARM host): the lean forward would call kernels that are not there, so it declines and
    the model runs transformers' forward on torch's GEMM."""
    model = MODELS["llama"]()
    assert lean.supports(model)
    monkeypatch.setattr(lean.isa, "ISA", None)
    assert not lean.supports(model)
