"""`dense`: every weight stored, in fp32, bf16, int8 or int4.

Example:
    >>> import torch
    >>> DenseWeight.pack(torch.ones(2, 3), dtype="int8").values.shape
    torch.Size([2, 3])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import PackedWeight


@dataclass(eq=False, repr=False)
class DenseWeight(PackedWeight):
    """All weights, row-major, no index data."""

    name: ClassVar[str] = "dense"
    tensor_names: ClassVar[tuple[str, ...]] = ("values",)
    values: torch.Tensor = None  # type: ignore[assignment]

    @classmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, **params: Any) -> dict[str, Any]:
        from .values import store_values

        return {"values": store_values(grid, dtype)}

    def dense_grid(self) -> torch.Tensor:
        return self._logical_values(self.shape)

    def _check(self) -> None:
        count = self.shape[0] * self.shape[1]
        self._expect_values(count, self.shape)
