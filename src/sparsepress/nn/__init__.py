"""Modules that run compressed weights (SparseLinear, ElasticLinear, QuantizedEmbedding) and their runtime knobs."""

from .activation import set_activation_sparsity
from .elastic import ElasticLinear, set_sparsity
from .embedding import QuantizedEmbedding
from .sparse_linear import SparseLinear
from .threads import set_num_threads

__all__ = ["ElasticLinear", "QuantizedEmbedding", "SparseLinear", "set_activation_sparsity", "set_num_threads",
           "set_sparsity"]
