"""The small-M linear kernel: correct, batch-invariant (bit-identical rows for any row count), checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from specdec import fast_linear


@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (33, 16), (300, 70), (257, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_and_is_batch_invariant(n, k, dtype):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    x = torch.randn(fast_linear.MAX_ROWS, k, generator=g)
    ref = F.linear(x, w.float(), bias)
    for m in (1, 2, 3, 5, 8, 9, 16):
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
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32 or bfloat16"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32 or bfloat16"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
