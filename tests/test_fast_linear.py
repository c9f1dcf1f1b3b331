"""The small-M linear kernel over float weights, on every instruction-set path this CPU runs: correct,
batch-invariant (bit-identical rows for any row count), checked; and SPECDEC_ISA's switch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from specdec.models import isa
from specdec.models import linear as fast_linear
from specdec.models import quant
from tiny import llama


@pytest.mark.parametrize("path", isa.supported())
@pytest.mark.parametrize("n,k", [(1, 1), (7, 15), (33, 16), (300, 72), (257, 1536)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_torch_and_is_batch_invariant(n, k, dtype, path):
    g = torch.Generator().manual_seed(n * 1000 + k)
    w = torch.randn(n, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g)
    x = torch.randn(fast_linear.MAX_ROWS, k, generator=g)
    ref = F.linear(x, w.float(), bias)
    for m in (1, 2, 3, 5, 7, 8, 9, 16, 17, 25, 32):  # 1-4 blocks of 8 rows, full and partial
        y = fast_linear.linear(x[:m], w, bias, isa=path)
        torch.testing.assert_close(y, ref[:m], rtol=1e-4, atol=1e-4 * k**0.5)
        for i in range(m):  # every row equals the same row computed alone, bit for bit
            assert torch.equal(y[i], fast_linear.linear(x[i : i + 1], w, bias, isa=path)[0])


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
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32 or bfloat16 tensor"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(8, 4).t())
    with pytest.raises(ValueError, match="weight must be a contiguous CPU float32 or bfloat16 tensor"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="SPECDEC_ISA must be auto or one of"):
        fast_linear.linear(torch.randn(2, 8), torch.randn(4, 8), isa="neon")


def test_quantize_model_replaces_every_linear_and_keeps_a_tied_embedding():
    model = llama(50, seed=2, hidden=128, tied=True)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    embedding = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 50, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
        assert quant.quantize_model(model, "int8") == 2 * 7 + 1  # q k v o gate up down per layer, and the head
        after = model(ids).logits
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert torch.equal(model.get_input_embeddings().weight, embedding)
    assert model.get_output_embeddings().out_features == 50
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.9


def test_specdec_isa_forces_the_path_of_the_process():
    """SPECDEC_ISA=portable makes every default call take the portable loop: the same bits as asking for it."""
    code = (
        "import sys, torch; from specdec.models import isa, linear, quant; g = torch.Generator().manual_seed(5); "
        "w = torch.randn(37, 256, generator=g); x = torch.randn(11, 256, generator=g); q = quant.quantize(w, 'q4'); "
        "sys.stdout.write(str(isa.ISA) + ' ' + linear.linear(x, w).numpy().tobytes().hex() + ' ' "
        "+ quant.linear(x, q).numpy().tobytes().hex() + ' ' + linear.linear(x, w, isa='portable').numpy().tobytes().hex() "
        "+ ' ' + quant.linear(x, q, isa='portable').numpy().tobytes().hex())"
    )
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "SPECDEC_ISA": "portable"}).stdout.split()  # fmt: skip
    assert forced[0] == "portable"
    assert forced[1] == forced[3] and forced[2] == forced[4]
    said = subprocess.run([sys.executable, "-c", "from specdec.models import isa; print(isa.describe())"], capture_output=True,
                          text=True, check=True, env={**os.environ, "SPECDEC_ISA": "portable"}).stdout  # fmt: skip
    assert said.startswith("small-M kernels: portable path (forced by SPECDEC_ISA); this CPU runs")
    bad = subprocess.run([sys.executable, "-c", "import specdec.models.isa"], capture_output=True, text=True,
                         env={**os.environ, "SPECDEC_ISA": "sse9"})  # fmt: skip
    assert bad.returncode != 0 and "SPECDEC_ISA must be auto or one of" in bad.stderr
