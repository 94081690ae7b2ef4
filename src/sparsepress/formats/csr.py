"""`csr`: compressed sparse rows (row pointers, column indices, values) for very high sparsity.

Example:
    >>> import torch
    >>> p = CSRWeight.pack(torch.tensor([[0.0, 5.0], [0.0, 0.0]]))
    >>> p.row_ptr.tolist(), p.col_indices.tolist(), p.col_indices.dtype
    ([0, 1, 1], [1], torch.int16)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import LayoutMismatch, PackedWeight
from .values import store_values


def index_dtype(in_features: int) -> torch.dtype:
    """int16 column indices while they fit, else int32.

    Example:
        >>> index_dtype(4096), index_dtype(40000)
        (torch.int16, torch.int32)
    """
    return torch.int16 if in_features <= 32767 else torch.int32


@dataclass(eq=False, repr=False)
class CSRWeight(PackedWeight):
    """Standard CSR with ascending columns per row."""

    name: ClassVar[str] = "csr"
    tensor_names: ClassVar[tuple[str, ...]] = ("row_ptr", "col_indices", "values")
    row_ptr: torch.Tensor = None  # type: ignore[assignment]
    col_indices: torch.Tensor = None  # type: ignore[assignment]
    values: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, **params: Any) -> dict[str, Any]:
        if params:
            raise TypeError(f"unexpected csr parameters {sorted(params)}")
        keep = grid != 0
        rows, cols = keep.nonzero(as_tuple=True)
        counts = keep.sum(dim=1)
        return {
            "row_ptr": torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]).to(torch.int32),
            "col_indices": cols.to(index_dtype(grid.shape[1])),
            "values": store_values(grid[keep], dtype),
        }

    @property
    def nnz(self) -> int:
        return int(self.row_ptr[-1])

    def dense_grid(self) -> torch.Tensor:
        kept = self._logical_values((self.nnz,))
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.shape[0]), counts)
        grid = torch.zeros(self.shape, dtype=kept.dtype)
        grid[rows, self.col_indices.long()] = kept
        return grid

    def _check(self) -> None:
        rows, cols = self.shape
        self._expect("row_ptr", torch.int32, (rows + 1,))
        steps = self.row_ptr[1:] - self.row_ptr[:-1]
        if int(self.row_ptr[0]) != 0 or bool((steps < 0).any()):
            raise LayoutMismatch("row_ptr must start at 0 and never decrease")
        self._expect("col_indices", index_dtype(cols), (self.nnz,))
        columns = self.col_indices.long()
        if bool(((columns < 0) | (columns >= cols)).any()):
            raise LayoutMismatch(f"column indices must lie in [0, {cols})")
        same_row = torch.repeat_interleave(torch.arange(rows), steps.long())
        ascending = (columns[1:] > columns[:-1]) | (same_row[1:] != same_row[:-1])
        if not bool(ascending.all()):
            raise LayoutMismatch("column indices must ascend within each row")
        self._expect_values(self.nnz)
