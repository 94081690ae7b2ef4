"""The removable units of a block: FFN channels, or attention heads grouped with their key/value head.

A unit owns rows of its producer Linear layers (FFN up / gate; query, key, value) and columns of its
consumer (FFN down; attention output). Removing it removes those rows and columns together. Under
grouped-query attention a unit is a whole KV group: its key and value heads and the query heads that
read them, so the grouping survives any removal.

Example:
    >>> from sparsepress.models.anatomy import BlockAnatomy
    >>> a = BlockAnatomy(0, "b", "b.q", ("b.k", "b.v"), None, "b.o", ("b.up",), "b.down", "b", "b",
    ...                  heads=4, kv_heads=2, head_dim=2, ffn_width=3)
    >>> units = head_units(a)
    >>> units.count, units.rows["b.q"][1].tolist(), units.rows["b.k"][1].tolist(), units.columns[1].tolist()
    (2, [4, 5, 6, 7], [2, 3], [4, 5, 6, 7])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.anatomy import BlockAnatomy


@dataclass(frozen=True)
class Units:
    """The units of one block for one pattern: each one's rows in every producer, columns in the consumer."""

    pattern: str
    rows: dict[str, list[torch.Tensor]]
    consumer: str
    columns: list[torch.Tensor]

    @property
    def count(self) -> int:
        return len(self.columns)

    def kept_rows(self, name: str, keep: list[int]) -> torch.Tensor:
        """Row indices of producer `name` that the kept units own, ascending (a fused [q; k; v]
        projection keeps its three segments in place)."""
        return torch.cat([self.rows[name][u] for u in keep]).sort().values if keep else torch.zeros(0, dtype=torch.long)

    def kept_columns(self, keep: list[int]) -> torch.Tensor:
        """Column indices of the consumer that the kept units own, in order."""
        return torch.cat([self.columns[u] for u in keep]).sort().values if keep else torch.zeros(0, dtype=torch.long)


def channel_units(anatomy: BlockAnatomy) -> Units:
    """One unit per FFN channel: row j of every FFN input projection, column j of the output projection.

    Example:
        >>> from sparsepress.models.anatomy import BlockAnatomy
        >>> a = BlockAnatomy(0, "b", "b.q", ("b.k", "b.v"), None, "b.o", ("b.up",), "b.down", "b", "b", 2, 2, 4, 3)
        >>> channel_units(a).count
        3
    """
    single = [torch.tensor([j]) for j in range(anatomy.ffn_width)]
    return Units("channel", {name: single for name in anatomy.ffn_in}, anatomy.ffn_out, single)


def head_units(anatomy: BlockAnatomy) -> Units:
    """One unit per key/value group (see the module example); without GQA, one per head."""
    hd, size = anatomy.head_dim, anatomy.group_size

    def span(start: int, count: int) -> torch.Tensor:
        return torch.arange(start * hd, (start + count) * hd)

    q_rows = [span(g * size, size) for g in range(anatomy.kv_heads)]
    kv_rows = [span(g, 1) for g in range(anatomy.kv_heads)]
    if anatomy.fused is not None:
        q_total, kv_total = anatomy.heads * hd, anatomy.kv_heads * hd
        fused = [torch.cat([q, kv + q_total, kv + q_total + kv_total]) for q, kv in zip(q_rows, kv_rows)]
        rows = {anatomy.fused: fused}
    else:
        rows = {anatomy.q: q_rows, **{name: kv_rows for name in anatomy.kv}}  # type: ignore[dict-item]
    return Units("head", rows, anatomy.o, q_rows)


UNIT_MAKERS = {"channel": channel_units, "head": head_units}
