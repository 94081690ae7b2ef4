"""Unstructured and semi-structured pruning: statistics, scorers, masks, solvers, allocation."""

from .allocation import LayerSummary, allocate_sparsity
from .magnitude import score_magnitude
from .masks import MaskSpec, select_mask
from .solve import CompressedWeight, compress_weight
from .sparsegpt import prune_sparsegpt
from .stats import LayerStats
from .wanda import score_wanda

__all__ = [
    "CompressedWeight",
    "LayerStats",
    "LayerSummary",
    "MaskSpec",
    "allocate_sparsity",
    "compress_weight",
    "prune_sparsegpt",
    "score_magnitude",
    "score_wanda",
    "select_mask",
]
