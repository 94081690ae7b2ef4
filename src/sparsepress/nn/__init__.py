"""Modules that run compressed weights: SparseLinear, ElasticLinear and QuantizedEmbedding."""

from .activation import set_activation_sparsity
from .elastic import ElasticLinear, set_sparsity
from .embedding import QuantizedEmbedding
from .sparse_linear import SparseLinear

__all__ = ["ElasticLinear", "QuantizedEmbedding", "SparseLinear", "set_activation_sparsity", "set_sparsity"]
