"""Architecture adapters: which modules are blocks, which Linear belongs to which block."""

from .layout import BLOCK_PATHS, ModelLayout, convert_conv1d_, find_layout, linear_layers, replace_module

__all__ = ["BLOCK_PATHS", "ModelLayout", "convert_conv1d_", "find_layout", "linear_layers", "replace_module"]
