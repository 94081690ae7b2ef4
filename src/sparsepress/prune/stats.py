"""Calibration statistics of one Linear layer's inputs: the Hessian proxy and per-input energy.

Example:
    >>> import torch
    >>> stats = LayerStats(3)
    >>> stats.add(torch.eye(3))
    >>> stats.n_tokens, stats.hessian.diagonal().tolist(), stats.act_norm_sq.tolist()
    (3, [0.6666666666666666, 0.6666666666666666, 0.6666666666666666], [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import torch

from ..errors import PoisonedWeightError


class LayerStats:
    """Accumulates `sum x x^T` (float64) over calibration tokens of a Linear's input.

    `hessian` is mean-normalised, `2 / n * sum x x^T` (the GPTQ / SparseGPT convention, float64);
    `act_norm_sq` is `sum_t x_tj^2` per input feature (Wanda's squared activation norm, float32).

    Example:
        >>> import torch
        >>> s = LayerStats(2, name="fc")
        >>> s.add(torch.tensor([[1.0, 2.0]])); s.add(torch.tensor([[[3.0, 0.0]]]))
        >>> s.n_tokens, s.act_norm_sq.tolist()
        (2, [10.0, 4.0])
    """

    def __init__(self, in_features: int, name: str | None = None):
        self.in_features = int(in_features)
        self.name = name
        self.n_tokens = 0
        # Allocated on the first batch: layers that share another layer's inputs never allocate one.
        self._xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs `[..., in_features]` (every leading index is a token)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name or 'layer'}: calibration input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )
        flat = x.detach().reshape(-1, self.in_features).to(torch.float32)
        # One float32 GEMM per batch (fast), summed across batches in float64 (accurate); NaN or Inf
        # anywhere in x shows on the product's diagonal, so no separate pass over x is needed.
        product = flat.T @ flat
        if not torch.isfinite(product.diagonal()).all():
            raise PoisonedWeightError(self.name or "<layer>", "calibration activations")
        if self._xtx is None:
            self._xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self._xtx += product
        self.n_tokens += flat.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        """The raw sum `sum x x^T` (float64)."""
        if self._xtx is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        return self._xtx

    @property
    def hessian(self) -> torch.Tensor:
        """`2 / n * sum x x^T` (float64 [in, in]); raises ValueError before any token was added."""
        if self.n_tokens == 0:
            raise ValueError(f"{self.name or 'layer'}: no calibration tokens were recorded")
        return self.xtx * (2.0 / self.n_tokens)

    @property
    def act_norm_sq(self) -> torch.Tensor:
        """`sum_t x_tj^2` per input feature (float32 [in])."""
        return self.xtx.diagonal().to(torch.float32).clone()
