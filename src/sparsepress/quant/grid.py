"""The symmetric integer grid every quantizer and packer shares.

`q = clamp(round(w / s), qmin, qmax)` with one scale `s > 0` per (row, group), group = column // group_size;
int8: q in [-127, 127], int4: q in [-8, 7] with s = absmax / 7. Dequantized weights are `q.float() * s`,
so `round(weight / s)` recovers q exactly.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    >>> q, s = quantize_to_grid(w, 8, None)
    >>> q.tolist(), dequantize(q, s, None).tolist()
    ([[127, -64, 32, 0]], [[1.0, -0.5039370059967041, 0.25196850299835205, 0.0]])
"""

from __future__ import annotations

import math

import torch

QUANT_RANGES: dict[int, tuple[int, int]] = {8: (-127, 127), 4: (-8, 7)}


def quant_range(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a bit width.

    Example:
        >>> quant_range(4)
        (-8, 7)
    """
    if bits not in QUANT_RANGES:
        raise ValueError(f"unsupported bit width {bits}; allowed: {' | '.join(map(str, QUANT_RANGES))}")
    return QUANT_RANGES[bits]


def count_groups(in_features: int, group_size: int | None) -> int:
    """Scale groups per row: 1 without groups, else ceil(in / group_size).

    Example:
        >>> count_groups(300, 128), count_groups(300, None)
        (3, 1)
    """
    return 1 if group_size is None else math.ceil(in_features / group_size)


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Scales [out, n_groups] broadcast to [out, in].

    Example:
        >>> import torch
        >>> expand_scales(torch.tensor([[1.0, 2.0]]), 3, 2).tolist()
        [[1.0, 1.0, 2.0]]
    """
    if group_size is None:
        return scales[:, :1].expand(-1, in_features)
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def scales_from_absmax(absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """`absmax / qmax` as float32, with 1.0 where absmax is 0 (so s > 0 always).

    Example:
        >>> import torch
        >>> scales_from_absmax(torch.tensor([7.0, 0.0]), 4).tolist()
        [1.0, 1.0]
    """
    scales = absmax.float() / quant_range(bits)[1]
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def compute_scales(weight: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Round-to-nearest scales (float32 [out, n_groups]) from each row's / group's absolute maximum.

    Example:
        >>> import torch
        >>> compute_scales(torch.tensor([[2.0, -3.5, 1.0]]), 4, 2).tolist()
        [[0.5, 0.1428571492433548]]
    """
    rows, cols = weight.shape
    width = group_size or cols
    groups = count_groups(cols, group_size)
    padded = weight.new_zeros(rows, groups * width, dtype=torch.float32)
    padded[:, :cols] = weight.detach().abs().float()
    return scales_from_absmax(padded.view(rows, groups, width).amax(dim=2), bits)


def round_to_grid(values: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers `clamp(round(values / scales), qmin, qmax)` (same dtype as values, broadcasting).

    Example:
        >>> import torch
        >>> round_to_grid(torch.tensor([0.9, -9.0]), torch.tensor([0.5, 1.0]), 4).tolist()
        [2.0, -8.0]
    """
    low, high = quant_range(bits)
    return torch.round(values / scales).clamp_(low, high)


def quantize_to_grid(
    weight: torch.Tensor, bits: int, group_size: int | None, scales: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integers (int8 [out, in]) and scales (float32 [out, n_groups]) of `weight` on the grid.

    Example:
        >>> import torch
        >>> quantize_to_grid(torch.tensor([[0.7, -1.4]]), 4, None)[0].tolist()
        [[4, -7]]
    """
    weight = weight.detach().float()
    if scales is None:
        scales = compute_scales(weight, bits, group_size)
    q = round_to_grid(weight, expand_scales(scales, weight.shape[1], group_size), bits)
    return q.to(torch.int8), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """`q.float() * s` (float32 [out, in]): exactly on the grid.

    Example:
        >>> import torch
        >>> dequantize(torch.tensor([[3, -2]], dtype=torch.int8), torch.tensor([[0.5]]), None).tolist()
        [[1.5, -1.0]]
    """
    return q.float() * expand_scales(scales.float(), q.shape[1], group_size)
