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
from .refit import damped


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
        self._cross: torch.Tensor | None = None
        self._sum = torch.zeros(self.in_features, dtype=torch.float64)
        self._dense_sum = torch.zeros(self.in_features, dtype=torch.float64)
        self._paired = False
        # After `settle`: the sum turned into the Hessian in place (one [in, in] float64 for the solve).
        self._settled: torch.Tensor | None = None
        self._act_norm_sq: torch.Tensor | None = None

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.name or 'layer'}: calibration input has {x.shape[-1]} features, "
                f"expected {self.in_features}"
            )
        return x.detach().reshape(-1, self.in_features).to(torch.float32)

    def add(self, x: torch.Tensor, dense_x: torch.Tensor | None = None) -> None:
        """Add a batch of inputs `[..., in_features]` (every leading index is a token).

        `dense_x`: the same tokens' inputs in the dense model; accumulates `sum x dense_x^T` for
        `dense_target`.
        """
        if self._settled is not None:
            raise ValueError(f"{self.name or 'layer'}: statistics were settled; no more inputs can be added")
        flat = self._flat(x)
        if dense_x is not None:
            dense = self._flat(dense_x)
            if dense.shape != flat.shape:
                raise ValueError(f"{self.name or 'layer'}: dense inputs {tuple(dense.shape)} do not pair with {tuple(flat.shape)}")
            if self._cross is None:
                self._cross = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
                self._paired = True
            self._cross += flat.T @ dense
            self._dense_sum += dense.sum(dim=0, dtype=torch.float64)
        # One float32 GEMM per batch (fast), summed across batches in float64 (accurate); NaN or Inf
        # anywhere in x shows on the product's diagonal, so no separate pass over x is needed.
        product = flat.T @ flat
        if not torch.isfinite(product.diagonal()).all():
            raise PoisonedWeightError(self.name or "<layer>", "calibration activations")
        if self._xtx is None:
            self._xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self._xtx += product
        self._sum += flat.sum(dim=0, dtype=torch.float64)
        self.n_tokens += flat.shape[0]

    @property
    def xtx(self) -> torch.Tensor:
        """The raw sum `sum x x^T` (float64); raises ValueError once `settle` turned it into the Hessian."""
        if self._settled is not None:
            raise ValueError(f"{self.name or 'layer'}: statistics were settled; only the Hessian is left")
        if self._xtx is None:
            return torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        return self._xtx

    @property
    def hessian(self) -> torch.Tensor:
        """`2 / n * sum x x^T` (float64 [in, in]); raises ValueError before any token was added.

        A new tensor at each call, until `settle`; from then on the one settled tensor (read it, never
        write it).
        """
        if self._settled is not None:
            return self._settled
        if self.n_tokens == 0:
            raise ValueError(f"{self.name or 'layer'}: no calibration tokens were recorded")
        return self.xtx * (2.0 / self.n_tokens)

    def settle(self, dense_weights: list[torch.Tensor] = (), strength: float = 0.0,  # type: ignore[assignment]
               dampening: float = 0.01) -> list[torch.Tensor]:
        """End the accumulation for the solve: returns each of `dense_weights` moved to its dense target
        (`dense_target`, which needs the pairing), then drops the dense cross-product and turns the sum
        into the Hessian in place, so the layer solve holds one [in, in] float64 where it held three
        (sum, cross-product and a Hessian copy per read: ~0.9 GB each for 11008 inputs). The results,
        `hessian`, `bias_gap` and `act_norm_sq` are bit for bit the unsettled ones; `xtx`, `add` and
        `dense_target` raise from then on. A second call returns the weights unchanged.

        Example:
            >>> import torch
            >>> s = LayerStats(2); s.add(torch.eye(2), dense_x=2 * torch.eye(2))
            >>> before = s.hessian
            >>> [w.tolist() for w in s.settle([torch.eye(2)], 1.0, dampening=0.0)]
            [[[2.0, 0.0], [0.0, 2.0]]]
            >>> torch.equal(s.hessian, before), s.tracks_dense
            (True, True)
        """
        if self._settled is not None:
            return list(dense_weights)
        targets = self._dense_targets(list(dense_weights), strength, dampening, release=True)
        self._cross = None
        if self.n_tokens == 0:
            return targets
        self._act_norm_sq = self.act_norm_sq
        self._settled = self.xtx.mul_(2.0 / self.n_tokens)  # in place: the same bits as `xtx * (2 / n)`
        self._xtx = None
        return targets

    def bias_gap(self, dense_weight: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Mean output of `dense_weight` on the dense inputs minus that of `weight` on these (float32 [out]).

        A Linear's mean output is its weight times its mean input, so this needs no forward pass; added
        to the bias it re-centres the compressed layer's outputs on the dense model's.

        Example:
            >>> import torch
            >>> s = LayerStats(1); s.add(torch.tensor([[1.0], [3.0]]), dense_x=torch.tensor([[2.0], [4.0]]))
            >>> s.bias_gap(torch.tensor([[1.0]]), torch.tensor([[0.5]])).tolist()
            [2.0]
        """
        if not self._paired or self.n_tokens == 0:
            raise ValueError(f"{self.name or 'layer'}: the bias gap needs inputs paired with the dense model's")
        dense_mean, mean = self._dense_sum / self.n_tokens, self._sum / self.n_tokens
        return (dense_weight.double() @ dense_mean - weight.double() @ mean).float()

    @property
    def tracks_dense(self) -> bool:
        """Whether dense-model inputs were paired with these (so `dense_target` can aim past them)."""
        return self._paired

    def dense_target(self, weight: torch.Tensor, strength: float, dampening: float = 0.01) -> torch.Tensor:
        """`weight` moved `strength` of the way to the weight that, fed these (compressed) inputs, best
        reproduces the dense model's outputs on its own inputs: W* = W C^T (X^T X)^-1, C = sum x dense_x^T.

        Pruning or quantizing toward W* with this Hessian minimises ||X W'^T - X_dense W^T||, so a layer
        also corrects what the compressed layers before it changed; a partial step keeps it from
        fitting the calibration set's noise.

        Example:
            >>> import torch
            >>> s = LayerStats(2); s.add(torch.eye(2), dense_x=2 * torch.eye(2))
            >>> s.dense_target(torch.eye(2), 1.0, dampening=0.0).tolist()
            [[2.0, 0.0], [0.0, 2.0]]
        """
        return self._dense_targets([weight], strength, dampening)[0]

    def _dense_targets(self, weights: list[torch.Tensor], strength: float, dampening: float,
                       release: bool = False) -> list[torch.Tensor]:
        # One LU factorisation of the damped sum for every weight (q, k and v share their inputs), made
        # in place of its copy: torch.linalg.solve would copy it again (same LAPACK calls, same bits).
        # The right-hand sides come first so that `release` drops the cross-product before the factor.
        if not weights or strength == 0 or not self._paired:
            return weights
        if self._settled is not None or self._cross is None:
            raise ValueError(f"{self.name or 'layer'}: statistics were settled; the dense target needs the pairing")
        sides = [self._cross @ weight.to(torch.float64).T for weight in weights]
        if release:
            self._cross = None
        factor = damped(self.xtx, dampening)
        pivots = torch.empty(factor.shape[0], dtype=torch.int32)
        torch.linalg.lu_factor_ex(factor, out=(factor, pivots, torch.empty((), dtype=torch.int32)))
        targets = []
        for weight, side in zip(weights, sides):
            best = torch.linalg.lu_solve(factor, pivots, side).T
            dense = weight.to(torch.float64)
            targets.append((dense + strength * (best - dense)).to(weight.dtype))
        return targets

    def pooled(self, pool: "LayerStats", tokens: float) -> "LayerStats":
        """These statistics topped up with `tokens` tokens' worth of `pool`'s (its mean second moment),
        unpaired: what a layer that saw too few tokens of its own falls back on.

        Example:
            >>> import torch
            >>> own, pool = LayerStats(1), LayerStats(1)
            >>> own.add(torch.tensor([[2.0]])); pool.add(torch.tensor([[1.0], [1.0]]))
            >>> mixed = own.pooled(pool, 3)
            >>> mixed.n_tokens, mixed.xtx.item()
            (4, 7.0)
        """
        mixed = LayerStats(self.in_features, name=self.name)
        scale = tokens / pool.n_tokens if pool.n_tokens else 0.0
        mixed._xtx = self.xtx + scale * pool.xtx
        mixed._sum = self._sum + scale * pool._sum
        mixed.n_tokens = self.n_tokens + (round(tokens) if pool.n_tokens else 0)
        return mixed

    @property
    def act_norm_sq(self) -> torch.Tensor:
        """`sum_t x_tj^2` per input feature (float32 [in])."""
        if self._act_norm_sq is not None:
            return self._act_norm_sq.clone()
        return self.xtx.diagonal().to(torch.float32).clone()
