"""Architecture adapters: which modules are blocks, which Linear belongs to which block, MoE layers."""

from .layout import BLOCK_PATHS, ModelLayout, convert_conv1d_, find_layout, linear_layers, replace_module
from .moe import MOE_FAMILIES, MoeFamily, MoeLayer, find_moe_layers, fuse_experts_, router_names, unfuse_experts_

__all__ = ["BLOCK_PATHS", "MOE_FAMILIES", "ModelLayout", "MoeFamily", "MoeLayer", "convert_conv1d_", "find_layout",
           "find_moe_layers", "fuse_experts_", "linear_layers", "replace_module", "router_names", "unfuse_experts_"]
