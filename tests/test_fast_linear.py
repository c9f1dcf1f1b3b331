"""The small-M linear kernel and its int8 variant: correct, batch-invariant (bit-identical rows for any row
count), checked."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specdec.models import linear as fast_linear
from tiny import llama


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (33, 16), (300, 70), (257, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_and_is_batch_invariant(n, k, dtype):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    x = torch.randn(fast_linear.MAX_ROWS, k, generator=g)
    ref = F.linear(x, w.float(), bias)
    for m in (1, 2, 3, 5, 7, 8, 9, 16, 17, 25, 32):  # 1-4 blocks of 8 rows, full and partial
        y = fast_linear.linear(x[:m], w, bias)
        torch.testing.assert_close(y, ref[:m], rtol=1e-4, atol=1e-4 * k**0.5)
        for i in range(m):  # every row equals the same row computed alone, bit for bit
            assert torch.equal(y[i], fast_linear.linear(x[i : i + 1], w, bias)[0])


def test_install_routes_small_inputs_and_keeps_results():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(40, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10, bias=False)).eval()
    x_small, x_large = torch.randn(3, 40), torch.randn(64, 40)
    with torch.inference_mode():
        before_small, before_large = model(x_small), model(x_large)
        assert fast_linear.install(model) == 2
        torch.testing.assert_close(model(x_small), before_small, rtol=1e-5, atol=1e-5)
        assert torch.equal(model(x_large), before_large)  # large inputs keep torch's GEMM


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="x must have 8 features"):
        fast_linear.linear(torch.randn(2, 7), torch.randn(4, 8))
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32, bfloat16 or int8"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32, bfloat16 or int8"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    q = torch.zeros(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="scale must be given exactly when weight is int8"):
        fast_linear.linear(torch.randn(2, 8), q)
    with pytest.raises(ValueError, match="scale must be given exactly when weight is int8"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(4, 8), scale=torch.ones(4))
    with pytest.raises(ValueError, match=r"scale must be a contiguous float32 tensor of shape \(4,\)"):
        fast_linear.linear(torch.randn(2, 8), q, scale=torch.ones(5))


def int8_reference(x: torch.Tensor, q: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The int8 kernel's arithmetic in torch: per-row int8 activations, an exact integer dot, then the scales."""
    sx = x.abs().amax(dim=1)
    sx = torch.where(sx > 0, sx / 127, torch.ones_like(sx))
    xq = torch.round(x / sx[:, None]).clamp(-127, 127).to(torch.int64)
    dot = (xq @ q.to(torch.int64).T).to(torch.float32)  # exact: |dot| < 2^24 for these shapes
    return dot * sx[:, None] * scale + bias


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (33, 16), (300, 70), (257, 1536), (19, 130)])
def test_int8_is_exact_integer_arithmetic_on_quantised_rows_and_batch_invariant(n, k):
    g = torch.Generator().manual_seed(n * 7 + k)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) / 100
    bias = torch.randn(n, generator=g)
    x = torch.randn(fast_linear.MAX_ROWS, k, generator=g)
    x[3] = 0.0  # an all-zero row: scale 1, not a division by zero
    ref = int8_reference(x, q, bias, scale)
    for m in (1, 2, 5, 8, 9, 16, 17, 32):
        y = fast_linear.linear(x[:m], q, bias, scale)
        torch.testing.assert_close(y, ref[:m], rtol=1e-6, atol=1e-6)
        for i in range(m):
            assert torch.equal(y[i], fast_linear.linear(x[i : i + 1], q, bias, scale)[0])
    # Close to the float product too (the activations' rounding is the only difference).
    torch.testing.assert_close(fast_linear.linear(x, q, bias, scale), F.linear(x, q.float() * scale[:, None], bias),
                               rtol=0.05, atol=0.02 * k**0.5 * float(scale.max()) * 127)  # fmt: skip


def test_int8_linear_quantises_within_half_a_step_and_takes_the_kernel_at_any_length():
    torch.manual_seed(1)
    lin = torch.nn.Linear(96, 40)
    with torch.no_grad():
        lin.weight[3].zero_()  # an all-zero row must stay zero, not divide by zero
    q = fast_linear.Int8Linear(lin)
    deq = q.qweight.float() * q.scale[:, None]
    assert q.qweight.dtype == torch.int8 and q.qweight.abs().max() <= 127
    assert torch.all((deq - lin.weight).abs() <= q.scale[:, None] / 2 + 1e-7)
    assert torch.equal(deq[3], torch.zeros(96))
    x = torch.randn(2, 2 * fast_linear.INT8_SLICE_ROWS + 5, 96)  # a prefill of three slices, batched
    with torch.inference_mode():
        y = q(x)
        assert y.shape == (2, 2 * fast_linear.INT8_SLICE_ROWS + 5, 40)
        rows = x.reshape(-1, 96)
        torch.testing.assert_close(y.reshape(-1, 40), int8_reference(rows, q.qweight, lin.bias, q.scale))  # the kernel
        for i in (0, fast_linear.INT8_SLICE_ROWS, rows.shape[0] - 1):  # each row as if alone, across slices
            assert torch.equal(y.reshape(-1, 40)[i], q(rows[i : i + 1])[0])
        torch.testing.assert_close(y, lin(x), rtol=0.05, atol=0.05)  # and close to the float layer
    with torch.enable_grad():  # autograd: torch's GEMM on the dequantised weight
        assert torch.equal(q(rows), F.linear(rows, deq, lin.bias))


def test_quantize_int8_replaces_every_linear_and_keeps_a_tied_embedding():
    model = llama(50, seed=2, hidden=32, tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 50, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
        assert fast_linear.quantize_int8(model) == 2 * 7 + 1  # q k v o gate up down per layer, and the head
        after = model(ids).logits
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.get_output_embeddings().out_features == 50
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


def test_the_portable_int8_loop_gives_the_vnni_paths_bits():
    """Integer sums are exact, so the VNNI path and the loop a CPU without it runs must agree bit for bit."""
    code = (
        "import sys, torch; from specdec.models import linear as f; g = torch.Generator().manual_seed(5); "
        "q = torch.randint(-127, 128, (37, 200), generator=g, dtype=torch.int8); s = torch.rand(37, generator=g); "
        "x = torch.randn(11, 200, generator=g); b = torch.randn(37, generator=g); "
        "sys.stdout.write(str(f.int8_is_fast()) + ' ' + f.linear(x, q, b, s).numpy().tobytes().hex())"
    )
    runs = {flag: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 env={**os.environ, **({"SPECDEC_NO_VNNI": "1"} if flag else {})}).stdout.split()
            for flag in (False, True)}  # fmt: skip
    assert runs[True][0] == "False"  # the switch took the portable loop
    assert runs[False][1] == runs[True][1]
