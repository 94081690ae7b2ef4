"""Row-wise symmetric quantization of embedding tables (one scale per row).

Example:
    >>> import torch
    >>> q, s = quantize_rows(torch.tensor([[1.0, -0.5], [0.0, 0.0]]), 8)
    >>> q.tolist(), s.tolist()
    ([[127, -64], [0, 0]], [0.007874015718698502, 1.0])
"""

from __future__ import annotations

import torch

from .grid import dequantize, quantize_to_grid


def quantize_rows(table: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (int8 [V, D]; int4 values in [-8, 7] stored unpacked) and scales (float32 [V]).

    Example:
        >>> import torch
        >>> quantize_rows(torch.tensor([[0.7, -1.4]]), 4)[0].tolist()
        [[4, -7]]
    """
    if table.dim() != 2:
        raise ValueError(f"an embedding table must be 2-D [V, D], got shape {tuple(table.shape)}")
    q, scales = quantize_to_grid(table, bits, None)
    return q, scales[:, 0].contiguous()


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Float32 table `q * scale[row]` (inverse of `quantize_rows` up to rounding).

    Example:
        >>> import torch
        >>> dequantize_rows(torch.tensor([[2, -1]], dtype=torch.int8), torch.tensor([0.5])).tolist()
        [[1.0, -0.5]]
    """
    return dequantize(q, scales.reshape(-1, 1), None)
