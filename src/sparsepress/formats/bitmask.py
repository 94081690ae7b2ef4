"""`bitmask`: one bit per weight says kept or not; kept values packed row after row.

Example:
    >>> import torch
    >>> p = BitmaskWeight.pack(torch.tensor([[0.0, 2.0], [3.0, 0.0]]))
    >>> p.values.tolist(), p.row_offsets.tolist()
    ([2.0, 3.0], [0, 1, 2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import LayoutMismatch, PackedWeight, bits_to_mask, mask_to_bits
from .values import store_values


def _popcount_rows(bits: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return table[bits.long()].sum(dim=1)


@dataclass(eq=False, repr=False)
class BitmaskWeight(PackedWeight):
    """Mask bits [out, ceil(in/8)] and the kept values; row offsets derived, never stored."""

    name: ClassVar[str] = "bitmask"
    tensor_names: ClassVar[tuple[str, ...]] = ("mask", "values")
    mask: torch.Tensor = None  # type: ignore[assignment]
    values: torch.Tensor = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        counts = _popcount_rows(self.mask) if self.mask.dim() == 2 else torch.zeros(0, dtype=torch.int64)
        self.row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])

    @classmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, **params: Any) -> dict[str, Any]:
        keep = grid != 0
        return {"mask": mask_to_bits(keep), "values": store_values(grid[keep], dtype)}

    @property
    def nnz(self) -> int:
        return int(self.row_offsets[-1])

    def dense_grid(self) -> torch.Tensor:
        keep = bits_to_mask(self.mask, self.shape[1])
        grid = torch.zeros(self.shape, dtype=self._logical_values((self.nnz,)).dtype)
        grid[keep] = self._logical_values((self.nnz,))
        return grid

    def _check(self) -> None:
        out_features, in_features = self.shape
        self._expect("mask", torch.uint8, (out_features, -(-in_features // 8)))
        tail = in_features % 8
        if tail and bool((self.mask[:, -1] >> tail).any()):
            raise LayoutMismatch("mask has bits set beyond in_features")
        self._expect_values(self.nnz)
