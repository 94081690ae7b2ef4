"""Magnitude importance: |W|.

Example:
    >>> import torch
    >>> score_magnitude(torch.tensor([[-2.0, 1.0]])).tolist()
    [[2.0, 1.0]]
"""

from __future__ import annotations

import torch

from .stats import LayerStats


def score_magnitude(weight: torch.Tensor, stats: LayerStats | None = None) -> torch.Tensor:
    """Importance `|W|` (float32 [out, in]); `stats` is accepted for a uniform scorer signature.

    Example:
        >>> import torch
        >>> score_magnitude(torch.tensor([[0.5, -3.0]])).tolist()
        [[0.5, 3.0]]
    """
    return weight.detach().float().abs()
