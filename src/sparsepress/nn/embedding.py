"""`QuantizedEmbedding`: an embedding table stored row-wise int8 or int4 with one scale per row.

Example:
    >>> import torch
    >>> from sparsepress.nn import QuantizedEmbedding
    >>> table = torch.nn.Embedding(10, 4)
    >>> q = QuantizedEmbedding.from_embedding(table, bits=8)
    >>> (q(torch.tensor([3])) - table(torch.tensor([3]))).abs().max().item() < 0.05
    True
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..formats.values import pack_nibbles, unpack_nibbles
from ..quant.embeddings import quantize_rows


class QuantizedEmbedding(nn.Module):
    """nn.Embedding look-alike over quantized rows; only the looked-up rows are dequantized."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, bits: int, embedding_dim: int,
                 padding_idx: int | None = None):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"embedding bits must be 8 or 4, got {bits}")
        self.bits, self.embedding_dim, self.padding_idx = bits, embedding_dim, padding_idx
        self.num_embeddings = codes.shape[0]
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.float().contiguous())

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, bits: int = 8) -> QuantizedEmbedding:
        """Quantize an nn.Embedding row-wise.

        Example:
            >>> QuantizedEmbedding.from_embedding(torch.nn.Embedding(5, 3), bits=4).codes.shape
            torch.Size([5, 2])
        """
        q, scales = quantize_rows(embedding.weight, bits)
        return cls(cls.encode(q, bits), scales, bits, embedding.embedding_dim, embedding.padding_idx)

    @classmethod
    def from_packed(cls, packed: Any, padding_idx: int | None = None) -> "QuantizedEmbedding":
        """A table reading a dense int8 / int4 packed weight's own integers and row scales (no copy):
        the input side of an LM head tied to its embedding.

        Example:
            >>> from sparsepress.formats import DenseWeight
            >>> head = DenseWeight.pack(torch.randn(5, 4), dtype="int8")
            >>> QuantizedEmbedding.from_packed(head).codes.data_ptr() == head.values.data_ptr()
            True
        """
        rows, dim = packed.shape
        if packed.name != "dense" or packed.dtype not in ("int8", "int4") or packed.group_size not in (None, dim):
            raise ValueError(f"a shared table needs a dense int8 / int4 weight with one scale per row, got "
                             f"{packed.name} {packed.dtype} (group_size {packed.group_size})")
        if packed.dtype == "int4" and dim % 2:
            raise ValueError("an int4 table shared with a head needs an even embedding width")
        codes = packed.values if packed.dtype == "int8" else packed.values.view(rows, dim // 2)
        return cls(codes, packed.scales.view(rows), int(packed.dtype[3:]), dim, padding_idx)

    @staticmethod
    def encode(q: torch.Tensor, bits: int) -> torch.Tensor:
        """Stored codes: int8 rows, or int4 nibbles packed per row ([V, ceil(D/2)] uint8)."""
        if bits == 8:
            return q
        rows, dim = q.shape
        padded = torch.zeros(rows, dim + dim % 2, dtype=torch.int8)
        padded[:, :dim] = q
        return pack_nibbles(padded).view(rows, -1)

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return codes.float()
        rows = codes.shape[0]
        return unpack_nibbles(codes, codes.numel() * 2).view(rows, -1)[:, : self.embedding_dim].float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self._decode(self.codes.index_select(0, flat)) * self.scales.index_select(0, flat)[:, None]
        return rows.view(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (materialized on access; for inspection and tied heads)."""
        return self._decode(self.codes) * self.scales[:, None]

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * 4

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}"
