"""`SparseLinear`: a Linear layer whose weight lives in a packed format and runs from it.

Example:
    >>> import torch
    >>> from sparsepress.nn import SparseLinear
    >>> linear = torch.nn.Linear(8, 4)
    >>> with torch.no_grad():
    ...     linear.weight[:, ::2] = 0
    >>> layer = SparseLinear.from_linear(linear, format="bitmask", dtype="fp32")
    >>> torch.allclose(layer(torch.ones(2, 8)), linear(torch.ones(2, 8)), atol=1e-5)
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats import PackedWeight, get_format
from .activation import active_threshold, sparsify_inputs

_FORMAT_PARAMS = {"nm": ("n", "m"), "bbs": ("bank", "k")}


class SparseLinear(nn.Module):
    """y = x W^T + b with W held packed (`dense`, `bitmask`, `nm`, `bbs`, `csr`; fp32/bf16/int8/int4).

    The forward runs the native kernel for the format where one exists, else the pure-torch
    reference (which unpacks). Int dtypes quantize activations per token to int8 on the fly.
    `activation` (None, or a name of `kernels.ACTIVATIONS`) is applied to the outputs in the same
    call; `sparsepress.fusion.fuse_activations` sets it where a model's activation module follows.
    """

    activation: str | None = None

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.in_features, self.out_features = packed.in_features, packed.out_features
        if bias is not None:
            bias = bias.detach().float().contiguous()
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias of shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self.register_buffer("bias", bias)
        # activation sparsity: one input threshold per stored level (nn/activation.py), or None
        self.register_buffer("act_thresholds", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: str = "bitmask",
        dtype: str = "fp32",
        *,
        scales: torch.Tensor | None = None,
        group_size: int | None = None,
        n: int = 2,
        m: int = 4,
        bank: int = 64,
        k: int | None = None,
    ) -> SparseLinear:
        """Pack the zeros already in `linear.weight`; ValueError when they do not fit `format`.

        Example:
            >>> layer = SparseLinear.from_linear(torch.nn.Linear(4, 2), format="dense", dtype="int8")
            >>> layer.packed.dtype
            'int8'
        """
        options: dict[str, Any] = {"n": n, "m": m, "bank": bank, "k": k}
        params = {p: options[p] for p in _FORMAT_PARAMS.get(format, ())}
        packed = get_format(format).pack(
            linear.weight.detach(), dtype=dtype, scales=scales, group_size=group_size, **params
        )
        return cls(packed, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import packed_linear

        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got shape {tuple(x.shape)}")
        # activation sparsity: packed_linear zeroes the small inputs itself, and its native kernels skip
        # the weight columns of zero inputs at few tokens
        threshold = active_threshold(self) if self.act_thresholds is not None else 0.0
        if x.dtype == torch.float32:  # the common case: packed_linear keeps the leading dims itself
            return packed_linear(x, self.packed, self.bias, self.activation, threshold=threshold)
        lead = x.shape[:-1]
        y = packed_linear(x.reshape(-1, self.in_features).to(torch.float32), self.packed, self.bias,
                          self.activation, threshold=threshold)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    def _sparsify_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x with the current activation-sparsity level's small inputs zeroed (x itself when off)."""
        if self.act_thresholds is not None:
            threshold = active_threshold(self)
            if threshold > 0.0:
                return sparsify_inputs(x, threshold)
        return x

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense weight (materialized on each access; for inspection and reference)."""
        return self.packed.unpack()

    @property
    def nbytes(self) -> int:
        """Bytes of everything packed: values, indices/masks, scales and bias."""
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.packed.nbytes + bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.packed.name}, "
            f"dtype={self.packed.dtype}, sparsity={self.packed.sparsity:.3f}, bias={self.bias is not None}"
            + (f", activation={self.activation}" if self.activation else "")
        )
