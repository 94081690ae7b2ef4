"""Modules that run compressed weights: SparseLinear and QuantizedEmbedding."""

from .activation import set_activation_sparsity
from .embedding import QuantizedEmbedding
from .sparse_linear import SparseLinear

__all__ = ["QuantizedEmbedding", "SparseLinear", "set_activation_sparsity"]
