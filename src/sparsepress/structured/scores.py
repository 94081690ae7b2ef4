"""Importance scores of structured units (higher = more important), as callables.

- `magnitude`: the L2 norm of every weight the unit owns (producer rows and consumer columns);
- `activation` (Wanda-style): sqrt(sum over the unit's consumer columns c of ||a_c||^2 ||W[:, c]||^2):
  how large the unit's contribution to the block's output is on calibration data;
- `taylor`: the first-order estimate of the loss change when the unit is removed, sqrt(sum over samples
  of (sum over its columns and tokens of g * a)^2).

Example:
    >>> import torch
    >>> from torch import nn
    >>> from sparsepress.structured.stats import ColumnStats
    >>> from sparsepress.structured.units import Units
    >>> model = nn.ModuleDict({"up": nn.Linear(2, 2, bias=False), "down": nn.Linear(2, 2, bias=False)})
    >>> with torch.no_grad():
    ...     _ = model["up"].weight.copy_(torch.eye(2)); _ = model["down"].weight.copy_(torch.eye(2))
    >>> units = Units("channel", {"up": [torch.tensor([0]), torch.tensor([1])]}, "down", [torch.tensor([0]), torch.tensor([1])])
    >>> SCORES["activation"](model, units, ColumnStats(torch.tensor([4.0, 1.0], dtype=torch.float64))).tolist()
    [2.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .stats import ColumnStats
from .units import Units

Score = Callable[[nn.Module, Units, "ColumnStats | None"], torch.Tensor]


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight.detach().double()


def score_magnitude(model: nn.Module, units: Units, stats: ColumnStats | None = None) -> torch.Tensor:
    """L2 norm of the unit's producer rows and consumer columns (data-free)."""
    consumer = _weight(model, units.consumer).pow(2).sum(dim=0)
    total = torch.stack([consumer[c].sum() for c in units.columns])
    for name, rows in units.rows.items():
        produced = _weight(model, name).pow(2).sum(dim=1)
        total = total + torch.stack([produced[r].sum() for r in rows])
    return total.sqrt()


def _need(stats: ColumnStats | None, what: str) -> ColumnStats:
    if stats is None:
        raise ValueError(f"the {what} score needs calibration statistics of the unit's activations")
    return stats


def score_activation(model: nn.Module, units: Units, stats: ColumnStats | None) -> torch.Tensor:
    """Wanda-style: the unit's output energy on calibration data, sqrt(sum_c ||a_c||^2 ||W[:, c]||^2)."""
    energy = _need(stats, "activation").norm_sq * _weight(model, units.consumer).pow(2).sum(dim=0)
    return torch.stack([energy[c].sum() for c in units.columns]).sqrt()


def score_taylor(model: nn.Module, units: Units, stats: ColumnStats | None) -> torch.Tensor:
    """First-order Taylor: sqrt(sum over samples of (sum over the unit's columns of g * a)^2)."""
    terms = _need(stats, "taylor").taylor
    if terms is None:
        raise ValueError("the taylor score needs gradient statistics (collect_unit_stats(..., taylor=True))")
    return torch.stack([terms[:, c].sum(dim=1).pow(2).sum() for c in units.columns]).sqrt()


SCORES: dict[str, Score] = {"magnitude": score_magnitude, "activation": score_activation, "taylor": score_taylor}
