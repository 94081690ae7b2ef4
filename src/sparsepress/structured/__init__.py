"""Structured removal with real shape change: FFN channels, attention heads (whole KV groups under
GQA) and whole blocks; the result is a smaller dense model whose config says its new shapes.

Example:
    >>> from sparsepress.structured import remove_structure_
    >>> callable(remove_structure_)
    True
"""

from .remove import StructuredRecord, block_parameters, remove_structure_
from .shapes import apply_block_shapes_

__all__ = ["StructuredRecord", "apply_block_shapes_", "block_parameters", "remove_structure_"]
