"""`nm`: N kept of every M consecutive inputs; values [out, in/M*N] and compact in-group indices.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    >>> p = NMWeight.pack(w, n=2, m=4)
    >>> p.values.tolist(), torch.equal(p.unpack(), w)
    ([[1.0, 2.0, 3.0, 4.0]], True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import LayoutMismatch, PackedWeight, pack_bitstream, unpack_bitstream
from .values import store_values


def index_width(m: int) -> int:
    """Bits per in-group index: ceil(log2 m).

    Example:
        >>> index_width(4), index_width(8), index_width(5)
        (2, 3, 3)
    """
    return max(1, math.ceil(math.log2(m)))


def select_per_group(grid: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """In-group offsets [rows, groups, keep] of the `keep` largest |values| of each group, ascending.

    Ties keep the earlier position (stable), so packing is deterministic.

    Example:
        >>> select_per_group(torch.tensor([[0.0, 5.0, 0.0, 1.0]]), 4, 2).tolist()
        [[[1, 3]]]
    """
    rows, cols = grid.shape
    grouped = grid.float().abs().view(rows, cols // group, group)
    order = torch.sort(grouped, dim=2, descending=True, stable=True).indices[:, :, :keep]
    chosen = torch.sort(order, dim=2).values
    dropped = grouped.scatter(2, chosen, 0.0)
    if bool(dropped.ne(0).any()):
        raise ValueError(f"weight has more than {keep} non-zeros in some group of {group}")
    return chosen


@dataclass(eq=False, repr=False)
class NMWeight(PackedWeight):
    """N:M structured sparsity (2:4 by default)."""

    name: ClassVar[str] = "nm"
    params: ClassVar[tuple[str, ...]] = ("n", "m")
    tensor_names: ClassVar[tuple[str, ...]] = ("values", "indices")
    n: int = 2
    m: int = 4
    values: torch.Tensor = None  # type: ignore[assignment]
    indices: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, n: int = 2, m: int = 4, **params: Any) -> dict[str, Any]:
        if params:
            raise TypeError(f"unexpected nm parameters {sorted(params)}")
        if not 0 < n < m:
            raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
        rows, cols = grid.shape
        if cols % m:
            raise ValueError(f"in_features {cols} is not a multiple of M={m} for the {n}:{m} format")
        try:
            chosen = select_per_group(grid, m, n)
        except ValueError:
            raise ValueError(f"weight of shape {tuple(grid.shape)} is not {n}:{m} sparse") from None
        kept = grid.view(rows, cols // m, m).gather(2, chosen).reshape(rows, -1)
        return {
            "n": n,
            "m": m,
            "values": store_values(kept, dtype),
            "indices": pack_bitstream(chosen.reshape(rows, -1), index_width(m)),
        }

    @property
    def _kept_shape(self) -> tuple[int, int]:
        return (self.shape[0], self.shape[1] // self.m * self.n)

    def group_offsets(self) -> torch.Tensor:
        """In-group offsets of the kept entries, [out, in/M, N] int64."""
        rows, count = self._kept_shape
        codes = unpack_bitstream(self.indices, index_width(self.m), count)
        return codes.view(rows, -1, self.n)

    def dense_grid(self) -> torch.Tensor:
        rows, cols = self.shape
        kept = self._logical_values(self._kept_shape).view(rows, -1, self.n)
        grid = torch.zeros(rows, cols // self.m, self.m, dtype=kept.dtype)
        return grid.scatter(2, self.group_offsets(), kept).view(rows, cols)

    def _check(self) -> None:
        rows, cols = self.shape
        if not 0 < self.n < self.m or cols % self.m:
            raise LayoutMismatch(f"{self.n}:{self.m} does not fit in_features {cols}")
        count = self._kept_shape[1]
        self._expect("indices", torch.uint8, (rows, math.ceil(count * index_width(self.m) / 8)))
        self._expect_values(rows * count, self._kept_shape)
        offsets = self.group_offsets()
        if bool((offsets >= self.m).any()) or bool((offsets[..., 1:] <= offsets[..., :-1]).any()):
            raise LayoutMismatch("indices must be ascending offsets below M inside each group")
