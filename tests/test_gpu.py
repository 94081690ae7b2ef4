"""2:4 layers on CUDA (sparsepress.runtime.gpu): skipped cleanly without a GPU, except the CPU-side checks."""

from __future__ import annotations

import pytest
import torch
from tiny import token_ids

import sparsepress as sp
from sparsepress.runtime.gpu import SemiStructuredLinear, is_two_four, to_cuda

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_two_four_detection():
    assert is_two_four(torch.tensor([[0.0, 1.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0]]))
    assert not is_two_four(torch.tensor([[1.0, 1.0, 2.0, 0.0]]))
    assert not is_two_four(torch.zeros(1, 6))  # rows not made of whole groups of 4


def test_to_cuda_refuses_without_a_device_or_with_a_dtype_the_kernels_do_not_take():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(sp.InputError):
        to_cuda(model, dtype=torch.float32)  # refused before any device work, with or without CUDA


def _two_four_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=256)).eval()
    recipe = {"stages": [{"prune": {"method": "magnitude", "pattern": "2:4"}}, {"quantize": {"method": "rtn"}}],
              "format": "nm"}
    return sp.compress(model, recipe, calibration=token_ids(vocab=100))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_two_four_layers_run_on_sparse_tensor_cores_and_match_the_cpu_model(dtype):
    model = _two_four_bert()
    ids = torch.randint(0, 100, (4, 64), generator=torch.Generator().manual_seed(1))  # 256 tokens: the 2:4 kernel
    with torch.inference_mode():
        reference = model(input_ids=ids).last_hidden_state
    gpu = to_cuda(model, dtype=dtype)
    assert any(isinstance(m, SemiStructuredLinear) for m in gpu.modules())
    with torch.inference_mode():
        out = gpu(input_ids=ids.cuda()).last_hidden_state.float().cpu()
        small = gpu(input_ids=ids[:1, :8].cuda()).last_hidden_state.float().cpu()  # 8 tokens: the dense weight
    tolerance = 5e-2 if dtype == torch.float16 else 1e-1
    assert float((out - reference).norm()) <= tolerance * float(reference.norm())
    assert small.shape == (1, 8, 128) and bool(torch.isfinite(small).all())


@pytest.mark.gpu
@needs_cuda
def test_semi_structured_linear_matches_dense_on_both_paths():
    weight = torch.randn(128, 256, device="cuda", dtype=torch.float16)
    weight = weight * torch.tensor([1.0, 0.0, 1.0, 0.0], device="cuda", dtype=torch.float16).repeat(64)
    layer = SemiStructuredLinear(weight, None, dense_below=64)
    for tokens in (8, 256):
        x = torch.randn(tokens, 256, device="cuda", dtype=torch.float16)
        expected = x @ weight.t()
        assert torch.allclose(layer(x), expected, atol=5e-2, rtol=5e-2)
