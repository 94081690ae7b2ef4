"""Round-to-nearest weight quantization on the shared symmetric grid.

Example:
    >>> import torch
    >>> q, s = quantize_rtn(torch.tensor([[1.0, -2.0]]), 8, None)
    >>> q.tolist(), s.tolist()
    ([[64, -127]], [[0.015748031437397003]])
"""

from __future__ import annotations

import torch

from .grid import quantize_to_grid


def quantize_rtn(
    weight: torch.Tensor, bits: int, group_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (int8 [out, in]) and scales (float32 [out, n_groups]); zeros stay exactly zero.

    Example:
        >>> import torch
        >>> quantize_rtn(torch.tensor([[0.0, 0.7, -1.4]]), 4, None)[0].tolist()
        [[0, 4, -7]]
    """
    return quantize_to_grid(weight, bits, group_size)
