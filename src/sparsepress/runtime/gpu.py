"""2:4 layers on CUDA through PyTorch's semi-structured sparse tensors (Sparse Tensor Cores).

`to_cuda(model)` moves a compressed model to a CUDA device in fp16 or bf16: every packed layer whose
zeros are 2:4 along its rows (format `nm` with n=2, m=4, or any layer whose dequantized weight is 2:4)
becomes a `SemiStructuredLinear` holding the weight as `torch.sparse.to_sparse_semi_structured`
(cuSPARSELt where PyTorch has it, else CUTLASS), the other packed layers plain dense Linears (the
packed formats' kernels are CPU-only). 2:4 does not pay for few tokens (decode, small batches: the
matmul is bound by reading the weight, and the sparse kernels' setup dominates), so each 2:4 layer
also keeps the dense fp16 weight and runs it below `dense_below` tokens per call.

int8 Sparse Tensor Cores (cuSPARSELt's int8 mm) need int8 activations and an output scale per call;
that path is not wired here: int8 weights are dequantized to the float dtype.

Unmeasured: this session had no GPU. `pytest -m gpu` runs its tests where CUDA is present.

Example:
    >>> import torch
    >>> is_two_four(torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]]))
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..models import replace_module
from ..nn import SparseLinear
from .switch import disable_native_blocks

SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
# Tokens per call from which the 2:4 kernel runs (below it the dense weight): cuSPARSELt's fp16 2:4
# GEMMs gain over cuBLAS from a few hundred rows on Ampere / Hopper (PyTorch's and torchao's reports);
# unmeasured here, so a conservative default that callers can change.
DENSE_BELOW = 128


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights in each row has at least 2 zeros.

    Example:
        >>> is_two_four(torch.ones(2, 4))
        False
    """
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(dim=-1) <= 2).all())


def _fits_kernel(weight: torch.Tensor) -> bool:
    """Shapes the semi-structured kernels take: rows a multiple of 32 and columns of 64 (the stricter of
    the CUTLASS and cuSPARSELt fp16 constraints, so either backend accepts them)."""
    rows, cols = weight.shape
    return rows % 32 == 0 and cols % 64 == 0


class SemiStructuredLinear(nn.Module):
    """y = x W^T + b on CUDA: W as a 2:4 semi-structured sparse tensor from `dense_below` tokens on, the
    dense W below (see the module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dense_below: int = DENSE_BELOW):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        if not weight.is_cuda or weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError("SemiStructuredLinear takes a CUDA fp16 / bf16 weight")
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.dense_below = dense_below
        self.register_buffer("dense", weight.contiguous())
        self.register_buffer("bias", None if bias is None else bias.to(weight))
        self.sparse = to_sparse_semi_structured(self.dense)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features).to(self.dense.dtype)
        weight = self.sparse if x2d.shape[0] >= self.dense_below else self.dense
        return F.linear(x2d, weight, self.bias).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4, dense_below={self.dense_below}"


def to_cuda(model: nn.Module, dtype: torch.dtype = torch.float16, device: str | torch.device = "cuda",
            dense_below: int = DENSE_BELOW) -> nn.Module:
    """Move a compressed model to CUDA in `dtype`: 2:4 packed layers onto Sparse Tensor Cores, the other
    packed layers dense; returns the model (changed in place). InputError without CUDA or for a dtype
    the 2:4 kernels do not take.
    """
    if not torch.cuda.is_available():
        raise InputError("cuda", "no CUDA device is available")
    if dtype not in SEMI_STRUCTURED_DTYPES:
        raise InputError("dtype", f"{dtype} (2:4 kernels take {', '.join(str(d) for d in SEMI_STRUCTURED_DTYPES)})")
    disable_native_blocks(model)  # the CPU Stack points at the packed layers replaced below
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinear)]:
        weight = layer.packed.unpack().to(device=device, dtype=dtype)
        bias = None if layer.bias is None else layer.bias.to(device=device, dtype=dtype)
        if is_two_four(weight) and _fits_kernel(weight):
            new: nn.Module = SemiStructuredLinear(weight, bias, dense_below)
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=device, dtype=dtype)
            with torch.no_grad():
                new.weight.copy_(weight)
                if bias is not None:
                    new.bias.copy_(bias)
        if layer.activation is not None:  # a fused activation: run it after the layer, as it did
            from ..kernels import ACTIVATIONS

            new = nn.Sequential(new, _Activation(ACTIVATIONS[layer.activation][1]))
        replace_module(model, name, new)
    return model.to(device=device, dtype=dtype)


class _Activation(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


__all__ = ["DENSE_BELOW", "SemiStructuredLinear", "is_two_four", "to_cuda"]
