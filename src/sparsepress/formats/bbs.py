"""`bbs`: block-balanced sparsity; every bank of `bank` inputs in a row keeps exactly `k` entries.

Example:
    >>> import torch
    >>> w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 3.0, 4.0, 0.0]])
    >>> p = BBSWeight.pack(w, bank=4)
    >>> p.k, p.values.tolist()
    (2, [[1.0, 2.0, 3.0, 4.0]])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import LayoutMismatch, PackedWeight, bits_to_mask, mask_to_bits
from .nm import select_per_group
from .values import store_values


@dataclass(eq=False, repr=False)
class BBSWeight(PackedWeight):
    """Bank-balanced layout: mask bits (in-bank positions) + fixed-count values per bank."""

    name: ClassVar[str] = "bbs"
    params: ClassVar[tuple[str, ...]] = ("bank", "k")
    tensor_names: ClassVar[tuple[str, ...]] = ("mask", "values")
    bank: int = 64
    k: int = 32
    mask: torch.Tensor = None  # type: ignore[assignment]
    values: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def _layout(
        cls, grid: torch.Tensor, dtype: str, bank: int = 64, k: int | None = None, **params: Any
    ) -> dict[str, Any]:
        if params:
            raise TypeError(f"unexpected bbs parameters {sorted(params)}")
        rows, cols = grid.shape
        if bank < 1 or cols % bank:
            raise ValueError(f"in_features {cols} is not a multiple of the bbs bank {bank}")
        per_bank = grid.ne(0).view(rows, cols // bank, bank).sum(dim=2)
        needed = int(per_bank.max()) if per_bank.numel() else 0
        k = max(needed, 1) if k is None else k
        if not 0 < k <= bank:
            raise ValueError(f"bbs keep count k={k} must be in [1, bank={bank}]")
        if needed > k:
            raise ValueError(f"weight has {needed} non-zeros in a bank of {bank}; more than k={k}")
        chosen = select_per_group(grid, bank, k)
        keep = torch.zeros(rows, cols // bank, bank, dtype=torch.bool).scatter(2, chosen, True)
        kept = grid.view(rows, cols // bank, bank).gather(2, chosen).reshape(rows, -1)
        return {"bank": bank, "k": k, "mask": mask_to_bits(keep.view(rows, cols)), "values": store_values(kept, dtype)}

    @property
    def _kept_shape(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[1] // self.bank * self.k)

    def dense_grid(self) -> torch.Tensor:
        keep = bits_to_mask(self.mask, self.shape[1])
        kept = self._logical_values(self._kept_shape)
        grid = torch.zeros(self.shape, dtype=kept.dtype)
        grid[keep] = kept.reshape(-1)
        return grid

    def _check(self) -> None:
        rows, cols = self.shape
        if self.bank < 1 or cols % self.bank or not 0 < self.k <= self.bank:
            raise LayoutMismatch(f"bank {self.bank} / k {self.k} do not fit in_features {cols}")
        self._expect("mask", torch.uint8, (rows, -(-cols // 8)))
        counts = bits_to_mask(self.mask, cols).view(rows, -1, self.bank).sum(dim=2)
        if bool(counts.ne(self.k).any()):
            raise LayoutMismatch(f"every bank must keep exactly k={self.k} entries")
        if cols % 8 and bool((self.mask[:, -1] >> (cols % 8)).any()):
            raise LayoutMismatch("mask has bits set beyond in_features")
        self._expect_values(rows * self._kept_shape[1], self._kept_shape)
