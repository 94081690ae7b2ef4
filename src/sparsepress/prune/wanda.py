"""Wanda importance (Sun et al. 2023): |W_ij| * ||X_j||_2, compared within each output row.

Example:
    >>> import torch
    >>> from sparsepress.prune.stats import LayerStats
    >>> stats = LayerStats(2); stats.add(torch.tensor([[3.0, 0.0], [4.0, 1.0]]))
    >>> score_wanda(torch.tensor([[1.0, -2.0]]), stats).tolist()
    [[5.0, 2.0]]
"""

from __future__ import annotations

import torch

from .stats import LayerStats


def score_wanda(weight: torch.Tensor, stats: LayerStats | None) -> torch.Tensor:
    """Importance `|W| * sqrt(act_norm_sq)` per input column (float32 [out, in]).

    Example:
        >>> import torch
        >>> from sparsepress.prune.stats import LayerStats
        >>> s = LayerStats(1); s.add(torch.tensor([[2.0]]))
        >>> score_wanda(torch.tensor([[-1.5]]), s).tolist()
        [[3.0]]
    """
    if stats is None:
        raise ValueError("wanda needs calibration statistics (LayerStats) of the layer's inputs")
    return weight.detach().float().abs() * stats.act_norm_sq.sqrt().unsqueeze(0)
