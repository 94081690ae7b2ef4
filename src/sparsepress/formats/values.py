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

from ..quant.grid import count_groups, dequantize, quantize_to_grid

VALUE_DTYPES = ("fp32", "bf16", "int8", "int4")
BITS_OF = {"int8": 8, "int4": 4}
_FLOAT_STORAGE = {"fp32": torch.float32, "bf16": torch.bfloat16}


def is_integer(dtype: str) -> bool:
    """Whether `dtype` stores integers with scales.

    Example:
        >>> is_integer("int4"), is_integer("bf16")
        (True, False)
    """
    return dtype in BITS_OF


def check_dtype(dtype: str) -> str:
    """Return `dtype` or raise ValueError naming the allowed value dtypes.

    Example:
        >>> check_dtype("int8")
        'int8'
    """
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"unknown value dtype {dtype!r}; allowed: {' | '.join(VALUE_DTYPES)}")
    return dtype


def quantize_dense(
    weight: torch.Tensor, dtype: str, scales: torch.Tensor | None = None, group_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode a dense float weight in `dtype`: integers (int8 storage) + scales, or float storage.

    Given `scales` (e.g. from GPTQ) the integers are `round(w / s)`, exact when `w` lies on that grid
    (the grid itself is `sparsepress.quant.grid`, shared with the quantizers).

    Example:
        >>> quantize_dense(torch.tensor([[0.25]]), "bf16")[0].dtype
        torch.bfloat16
    """
    check_dtype(dtype)
    weight = weight.detach().float()
    if not is_integer(dtype):
        return weight.to(_FLOAT_STORAGE[dtype]), None
    if scales is not None:
        scales = scales.detach().float().reshape(weight.shape[0], -1).contiguous()
        if scales.shape[1] != count_groups(weight.shape[1], group_size):
            raise ValueError(
                f"scales of shape {tuple(scales.shape)} do not fit weight {tuple(weight.shape)} with group_size {group_size}"
            )
        if not torch.all(scales > 0) or not torch.all(torch.isfinite(scales)):
            raise ValueError("quantization scales must be finite and > 0")
    return quantize_to_grid(weight, BITS_OF[dtype], group_size, scales)


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
    return dequantize(stored, scales, group_size)


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
