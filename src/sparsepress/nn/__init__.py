"""Modules that run compressed weights: SparseLinear and QuantizedEmbedding."""

from .embedding import QuantizedEmbedding
from .sparse_linear import SparseLinear

__all__ = ["QuantizedEmbedding", "SparseLinear"]
