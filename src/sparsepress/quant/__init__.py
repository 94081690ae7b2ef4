"""Weight quantization: the shared grid, round-to-nearest and embedding tables.

GPTQ lives in `sparsepress.quant.gptq`; it runs on the OBS sweep of `sparsepress.prune.sparsegpt`,
so it is not imported here (the grid must stay importable without the pruning package).
"""

from .embeddings import dequantize_rows, quantize_rows
from .grid import QUANT_RANGES, compute_scales, dequantize, quant_range, quantize_to_grid
from .rtn import quantize_rtn

__all__ = [
    "QUANT_RANGES",
    "compute_scales",
    "dequantize",
    "dequantize_rows",
    "quant_range",
    "quantize_rows",
    "quantize_rtn",
    "quantize_to_grid",
]
