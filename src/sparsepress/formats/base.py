"""The packed-weight base class: quantize on the dense grid, then lay out the kept entries.

Example:
    >>> import torch
    >>> from sparsepress.formats import BitmaskWeight
    >>> w = torch.tensor([[0.0, 1.0, 0.0, -2.0]])
    >>> packed = BitmaskWeight.pack(w, dtype="fp32")
    >>> torch.equal(packed.unpack(), w)
    True
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from ..quant.grid import count_groups
from . import values as V


class LayoutMismatch(ValueError):
    """Stored tensors do not form a valid layout (wrong shape, dtype, count or missing)."""


@dataclass(eq=False)
class PackedWeight(ABC):
    """One Linear weight in a packed format. Subclasses add their tensors as dataclass fields.

    In memory the tensors are exactly the stored ones (docs/formats.md); `unpack()` gives the
    dequantized float32 weight. Subclasses implement `_layout` (dense grid -> fields) and
    `dense_grid` (fields -> dense grid), and `_check` (consistency of loaded tensors).
    """

    name: ClassVar[str]
    params: ClassVar[tuple[str, ...]] = ()
    tensor_names: ClassVar[tuple[str, ...]]

    shape: tuple[int, int]
    dtype: str
    scales: torch.Tensor | None
    group_size: int | None

    def __getstate__(self) -> dict[str, Any]:
        # copies (copy.deepcopy of a model) drop the native kernel handle cached on the weight:
        # it is rebuilt from the copied tensors on first use
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_sparsepress_")}

    @classmethod
    def pack(
        cls,
        weight: torch.Tensor,
        dtype: str = "fp32",
        scales: torch.Tensor | None = None,
        group_size: int | None = None,
        **params: Any,
    ) -> "PackedWeight":
        """Pack a dense float weight whose zeros fit this format; ValueError when they do not."""
        if weight.dim() != 2:
            raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("weight holds NaN or Inf")
        grid, scales = V.quantize_dense(weight, dtype, scales, group_size)
        layout = cls._layout(grid, dtype=dtype, **params)
        return cls(shape=tuple(weight.shape), dtype=dtype, scales=scales, group_size=group_size, **layout)

    @classmethod
    @abstractmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, **params: Any) -> dict[str, Any]:
        """Fields of this format from the dense grid (storage dtype, [out, in])."""

    @abstractmethod
    def dense_grid(self) -> torch.Tensor:
        """The dense grid [out, in] in storage dtype (int8 integers or float), zeros where not kept."""

    @abstractmethod
    def _check(self) -> None:
        """Raise LayoutMismatch when the tensors are inconsistent with shape and params."""

    def unpack(self) -> torch.Tensor:
        """The dequantized dense float32 weight [out, in]."""
        return V.dequantize_dense(self.dense_grid(), self.scales, self.dtype, self.group_size)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every stored tensor by suffix (values, masks/indices, scales)."""
        out = {name: getattr(self, name) for name in self.tensor_names}
        if self.scales is not None:
            out["scales"] = self.scales
        return out

    def meta(self) -> dict[str, Any]:
        """JSON-able description: format, dtype, shape, group_size and the format's params."""
        body: dict[str, Any] = {
            "format": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "group_size": self.group_size,
        }
        body.update({p: getattr(self, p) for p in self.params})
        return body

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> "PackedWeight":
        """Rebuild from `tensors()` and `meta()` output; LayoutMismatch on anything inconsistent."""
        try:
            shape = tuple(int(d) for d in meta["shape"])
            dtype = V.check_dtype(meta["dtype"])
            group_size = meta.get("group_size")
            params = {p: int(meta[p]) for p in cls.params}
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutMismatch(f"bad layer metadata {meta!r}: {exc}") from None
        if len(shape) != 2 or min(shape) < 1:
            raise LayoutMismatch(f"shape must be two positive sizes, got {list(shape)}")
        if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
            raise LayoutMismatch(f"group_size must be a positive integer or null, got {group_size!r}")
        missing = [name for name in cls.tensor_names if name not in tensors]
        if missing:
            raise LayoutMismatch(f"missing tensors {missing}")
        scales = tensors.get("scales")
        if V.is_integer(dtype):
            expected = (shape[0], count_groups(shape[1], group_size))
            if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != expected:
                raise LayoutMismatch(f"scales must be float32 {list(expected)}")
            if not (torch.isfinite(scales).all() and (scales > 0).all()):
                raise LayoutMismatch("scales must be finite and > 0")
        elif scales is not None:
            raise LayoutMismatch(f"dtype {dtype} takes no scales")
        packed = cls(
            shape=shape,  # type: ignore[arg-type]
            dtype=dtype,
            scales=scales,
            group_size=group_size,
            **params,
            **{name: tensors[name] for name in cls.tensor_names},
        )
        packed._check()
        return packed

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor (values, masks/indices, scales)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def n_kept(self) -> int:
        """Stored entries (kept weights, some possibly zero after quantization)."""
        return int(self.dense_grid().ne(0).sum())

    @property
    def sparsity(self) -> float:
        """Fraction of exact zeros in the dequantized weight."""
        return 1.0 - self.n_kept / (self.shape[0] * self.shape[1])

    # Shared checks used by subclasses' _check.
    def _expect(self, name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        tensor = getattr(self, name)
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
            got = f"{tensor.dtype} {list(tensor.shape)}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise LayoutMismatch(f"tensor '{name}' must be {dtype} {list(shape)}, got {got}")

    def _expect_values(self, count: int, shape: tuple[int, ...] | None = None) -> None:
        """`values` must hold `count` entries of this dtype (int4: nibble-packed bytes)."""
        if self.dtype == "int4":
            self._expect("values", torch.uint8, (math.ceil(count / 2),))
        else:
            self._expect("values", V.storage_dtype(self.dtype), shape or (count,))

    def _logical_values(self, shape: tuple[int, ...]) -> torch.Tensor:
        return V.load_values(self.values, self.dtype, shape)  # type: ignore[attr-defined]

    def __repr__(self) -> str:
        extra = "".join(f", {p}={getattr(self, p)}" for p in self.params)
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype}{extra}, nbytes={self.nbytes})"


def mask_to_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool mask [out, in] -> uint8 [out, ceil(in/8)], bit j%8 (LSB first) of byte j//8.

    Example:
        >>> mask_to_bits(torch.tensor([[True, False, True]])).tolist()
        [[5]]
    """
    out_features, in_features = mask.shape
    padded = torch.zeros(out_features, math.ceil(in_features / 8) * 8, dtype=torch.uint8)
    padded[:, :in_features] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return (padded.view(out_features, -1, 8) * weights).sum(dim=2, dtype=torch.int32).to(torch.uint8)


def bits_to_mask(bits: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `mask_to_bits`.

    Example:
        >>> bits_to_mask(torch.tensor([[5]], dtype=torch.uint8), 3).tolist()
        [[True, False, True]]
    """
    shifts = torch.arange(8, dtype=torch.uint8)
    expanded = (bits.unsqueeze(-1) >> shifts) & 1
    return expanded.reshape(bits.shape[0], -1)[:, :in_features].bool()


def pack_bitstream(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack small unsigned codes [rows, count] (each < 2**width) LSB-first into uint8 [rows, ceil(count*width/8)].

    Example:
        >>> pack_bitstream(torch.tensor([[1, 3, 0, 2]]), 2).tolist()
        [[141]]
    """
    rows, count = codes.shape
    bits = ((codes.to(torch.int64).unsqueeze(-1) >> torch.arange(width)) & 1).reshape(rows, count * width)
    nbytes = math.ceil(count * width / 8)
    padded = torch.zeros(rows, nbytes * 8, dtype=torch.int64)
    padded[:, : count * width] = bits
    return (padded.view(rows, nbytes, 8) << torch.arange(8)).sum(dim=2).to(torch.uint8)


def unpack_bitstream(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """Inverse of `pack_bitstream`: codes [rows, count] as int64.

    Example:
        >>> unpack_bitstream(torch.tensor([[141]], dtype=torch.uint8), 2, 4).tolist()
        [[1, 3, 0, 2]]
    """
    rows = packed.shape[0]
    bits = ((packed.to(torch.int64).unsqueeze(-1) >> torch.arange(8)) & 1).reshape(rows, -1)[:, : count * width]
    return (bits.view(rows, count, width) << torch.arange(width)).sum(dim=2)


def field_names(cls: type) -> list[str]:
    """Dataclass field names of a packed format (for introspection and tests)."""
    return [f.name for f in fields(cls)]
