"""Packed weight formats, one module each, looked up by name.

Example:
    >>> from sparsepress.formats import get_format
    >>> get_format("nm").__name__
    'NMWeight'
"""

from .base import LayoutMismatch, PackedWeight
from .bbs import BBSWeight
from .bitmask import BitmaskWeight
from .csr import CSRWeight
from .dense import DenseWeight
from .elastic import ElasticWeight
from .nm import NMWeight

FORMATS: dict[str, type[PackedWeight]] = {
    cls.name: cls for cls in (DenseWeight, BitmaskWeight, NMWeight, BBSWeight, CSRWeight)
}
# What a folder's layer entry may name: a format, or nested elastic levels over one (formats/elastic.py).
LAYOUTS: dict[str, type[PackedWeight]] = {**FORMATS, ElasticWeight.name: ElasticWeight}


def get_format(name: str) -> type[PackedWeight]:
    """The packed-format class registered under `name`; ValueError naming the allowed ones.

    Example:
        >>> get_format("csr").name
        'csr'
    """
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; allowed: {' | '.join(FORMATS)}") from None


__all__ = [
    "FORMATS",
    "BBSWeight",
    "BitmaskWeight",
    "CSRWeight",
    "DenseWeight",
    "ElasticWeight",
    "LAYOUTS",
    "LayoutMismatch",
    "NMWeight",
    "PackedWeight",
    "get_format",
]
