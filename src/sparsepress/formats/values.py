"""Value codecs shared by every packed format: quantize on the dense grid, nibble-pack int4.

Example:
    >>> import torch
    >>> q, s = quantize_dense(torch.tensor([[1.0, -0.5]]), "int8")
    >>> q.tolist(), dequantize_dense(q, s, "int8", None).tolist()
    ([[127, -64]], [[1.0, -0.5039370059967041]])
"""

from __future__ import annotations

import math

import torch

VALUE_DTYPES = ("fp32", "bf16", "int8", "int4")
INT_RANGES = {"int8": (-127, 127), "int4": (-8, 7)}
_FLOAT_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_integer(dtype: str) -> bool:
    """Whether `dtype` stores integers with scales.

    Example:
        >>> is_integer("int4"), is_integer("bf16")
        (True, False)
    """
    return dtype in INT_RANGES


def check_dtype(dtype: str) -> str:
    """Return `dtype` or raise ValueError naming the allowed value dtypes.

    Example:
        >>> check_dtype("int8")
        'int8'
    """
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value dtype {dtype!r}; allowed: {' | '.join(VALUE_DTYPES)}")
    return dtype


def n_groups(in_features: int, group_size: int | None) -> int:
    """Scale groups per row: 1 per channel, else ceil(in / group_size).

    Example:
        >>> n_groups(300, 128), n_groups(300, None)
        (3, 1)
    """
    return 1 if group_size is None else math.ceil(in_features / group_size)


def expand_scales(scales: torch.Tensor, in_features: int, group_size: int | None) -> torch.Tensor:
    """Scales [out, n_groups] broadcast to [out, in] (column j uses group j // group_size).

    Example:
        >>> expand_scales(torch.tensor([[1.0, 2.0]]), 3, 2).tolist()
        [[1.0, 1.0, 2.0]]
    """
    if group_size is None:
        return scales[:, :1].expand(-1, in_features)
    return scales.repeat_interleave(group_size, dim=1)[:, :in_features]


def absmax_scales(weight: torch.Tensor, dtype: str, group_size: int | None) -> torch.Tensor:
    """Round-to-nearest symmetric scales from the absolute maximum of each row (or group).

    Example:
        >>> absmax_scales(torch.tensor([[2.0, -3.5]]), "int4", None).tolist()
        [[0.5]]
    """
    out_features, in_features = weight.shape
    groups = n_groups(in_features, group_size)
    padded = torch.zeros(out_features, groups * (group_size or in_features), dtype=torch.float32)
    padded[:, :in_features] = weight.abs().float()
    absmax = padded.view(out_features, groups, -1).amax(dim=2)
    high = INT_RANGES[dtype][1]
    scales = absmax / high
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantize_dense(
    weight: torch.Tensor, dtype: str, scales: torch.Tensor | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a dense float weight in `dtype`: integers (int8 storage) + scales, or float storage.

    Given `scales` (e.g. from GPTQ) the integers are `round(w / s)`, exact when `w` lies on that grid.

    Example:
        >>> quantize_dense(torch.tensor([[0.25]]), "bf16")[0].dtype
        torch.bfloat16
    """
    check_dtype(dtype)
    weight = weight.detach().float()
    if not is_integer(dtype):
        return weight.to(_FLOAT_STORAGE[dtype]), None
    if scales is None:
        scales = absmax_scales(weight, dtype, group_size)
    scales = scales.detach().float().reshape(weight.shape[0], -1).contiguous()
    if scales.shape[1] != n_groups(weight.shape[1], group_size):
        raise ValueError(
            f"scales of shape {tuple(scales.shape)} do not fit weight {tuple(weight.shape)} with group_size {group_size}"
        )
    if not torch.all(scales > 0) or not torch.all(torch.isfinite(scales)):
        raise ValueError("quantization scales must be finite and > 0")
    low, high = INT_RANGES[dtype]
    q = torch.round(weight / expand_scales(scales, weight.shape[1], group_size)).clamp_(low, high)
    return q.to(torch.int8), scales


def dequantize_dense(
    stored: torch.Tensor, scales: torch.Tensor | None, dtype: str, group_size: int | None
) -> torch.Tensor:
    """Float32 weight from its stored dense form (inverse of `quantize_dense`).

    Example:
        >>> dequantize_dense(torch.tensor([[3]], dtype=torch.int8), torch.tensor([[0.5]]), "int8", None).tolist()
        [[1.5]]
    """
    if not is_integer(dtype):
        return stored.float()
    assert scales is not None
    return stored.float() * expand_scales(scales, stored.shape[1], group_size)


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 in [-8, 7], any shape) two per byte, low nibble first, flat.

    Example:
        >>> pack_nibbles(torch.tensor([1, -1, 7], dtype=torch.int8)).tolist()
        [241, 7]
    """
    flat = values.reshape(-1).to(torch.int16) & 0xF
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: `count` signed int4 values as int8.

    Example:
        >>> unpack_nibbles(torch.tensor([241, 7], dtype=torch.uint8), 3).tolist()
        [1, -1, 7]
    """
    data = packed.reshape(-1).to(torch.int16)
    nibbles = torch.stack([data & 0xF, data >> 4], dim=1).reshape(-1)[:count]
    return torch.where(nibbles >= 8, nibbles - 16, nibbles).to(torch.int8)


def store_values(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """The on-disk / in-memory tensor of a format's value array (int4 gets nibble-packed).

    Example:
        >>> store_values(torch.tensor([[1, 2]], dtype=torch.int8), "int4").shape
        torch.Size([1])
    """
    return pack_nibbles(values) if dtype == "int4" else values.contiguous()


def load_values(stored: torch.Tensor, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of `store_values`: the value array in its logical `shape`, int4 as int8.

    Example:
        >>> load_values(torch.tensor([33], dtype=torch.uint8), "int4", (1, 2)).tolist()
        [[1, 2]]
    """
    if dtype == "int4":
        return unpack_nibbles(stored, math.prod(shape)).view(shape)
    return stored.view(shape)


def storage_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of stored values for a value dtype.

    Example:
        >>> storage_dtype("int4")
        torch.uint8
    """
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8, "int4": torch.uint8}[dtype]
