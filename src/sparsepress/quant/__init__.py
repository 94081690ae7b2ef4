"""Weight quantization: the shared grid, round-to-nearest, GPTQ and embedding tables."""

from .embeddings import dequantize_rows, quantize_rows
from .gptq import GptqResult, GridColumnQuantizer, quantize_gptq
from .grid import QUANT_RANGES, compute_scales, dequantize, quant_range, quantize_to_grid
from .rtn import quantize_rtn

__all__ = [
    "QUANT_RANGES",
    "GptqResult",
    "GridColumnQuantizer",
    "compute_scales",
    "dequantize",
    "dequantize_rows",
    "quant_range",
    "quantize_gptq",
    "quantize_rows",
    "quantize_rtn",
    "quantize_to_grid",
]
