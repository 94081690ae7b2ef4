"""The `quantization_config` of a compressed-tensors folder, validated, and which scheme covers which layer.

Only what sparsepress can run exactly is accepted; everything else is refused by name (a format, a
weight type, a strategy, a transform). Fields compressed-tensors may add later are ignored.

Example:
    >>> config = CompressedTensorsConfig.model_validate({"quant_method": "compressed-tensors", "format": "int-quantized",
    ...     "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}}}})
    >>> config.config_groups["g"].weights.num_bits, config.format_of("g")
    (8, 'int-quantized')
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

QUANT_METHOD = "compressed-tensors"
# compressed-tensors 0.14's formats: the ones read here, and the ones refused by name.
QUANT_FORMATS = ("dense", "int-quantized", "naive-quantized", "pack-quantized")
SPARSE_FORMATS = ("dense", "sparse-bitmask", "sparse-24-bitmask")
REFUSED_FORMATS = {
    "float-quantized": "float (fp8) weights",
    "marlin-24": "the Marlin 2:4 GPU layout",
    "nvfp4-pack-quantized": "NVFP4 weights",
    "mxfp4-pack-quantized": "MXFP4 weights",
}
# Tensors beside the weights that describe activations, the KV cache or global scales: not needed here
# (sparsepress quantizes activations per token at run time).
IGNORED_SUFFIXES = ("input_scale", "input_zero_point", "output_scale", "output_zero_point", "k_scale", "v_scale",
                    "input_global_scale", "weight_global_scale")


class _Foreign(BaseModel):
    model_config = ConfigDict(extra="ignore")


class WeightArgs(_Foreign):
    """How one scheme quantizes weights (compressed-tensors' QuantizationArgs, the fields used here)."""

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: str | None = None
    group_size: int | None = None
    block_structure: list[int] | None = None
    actorder: Any = None

    @field_validator("type")
    @classmethod
    def _integer_only(cls, value: str) -> str:
        if value != "int":
            raise ValueError(f"weights of type {value!r} are not supported (only int)")
        return value

    @field_validator("num_bits")
    @classmethod
    def _bits(cls, value: int) -> int:
        if not 2 <= value <= 8:
            raise ValueError(f"{value}-bit weights are not supported (2..8)")
        return value

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str | None) -> str | None:
        if value not in (None, "tensor", "channel", "group", "block"):
            raise ValueError(f"weight strategy {value!r} is not supported (tensor | channel | group | block)")
        return value


class Scheme(_Foreign):
    """One config group: which modules, how their weights are quantized, in which format."""

    targets: list[str] = Field(default_factory=list)
    weights: WeightArgs | None = None
    format: str | None = None


class SparsityConfig(_Foreign):
    """The `sparsity_config` block: one format and structure for its targets."""

    format: str = "dense"
    sparsity_structure: str | None = "unstructured"
    targets: list[str] | None = None
    ignore: list[str] | None = None


class CompressedTensorsConfig(_Foreign):
    """A compressed-tensors `quantization_config`, checked for what sparsepress can run."""

    quant_method: Literal["compressed-tensors"] = "compressed-tensors"
    format: str | None = None
    config_groups: dict[str, Scheme] = Field(default_factory=dict)
    ignore: list[str] = Field(default_factory=list)
    sparsity_config: SparsityConfig | None = None
    transform_config: dict[str, Any] | None = None
    kv_cache_scheme: dict[str, Any] | None = None

    @field_validator("sparsity_config", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    def format_of(self, group: str) -> str:
        """The storage format of a config group (its own, else the config's, else dense)."""
        return self.config_groups[group].format or self.format or "dense"

    def problems(self) -> list[str]:
        """What this config asks for that sparsepress cannot run exactly (empty: all fine)."""
        found = []
        formats = {self.format_of(g) for g in self.config_groups} | ({self.format} - {None, "mixed-precision"})
        for fmt in sorted(f for f in formats if f not in QUANT_FORMATS):
            why = REFUSED_FORMATS.get(fmt, "unknown to sparsepress")
            found.append(f"quantization format {fmt!r} ({why}; supported: {', '.join(QUANT_FORMATS)})")
        if self.sparsity_config is not None and self.sparsity_config.format not in SPARSE_FORMATS:
            fmt = self.sparsity_config.format
            found.append(f"sparsity format {fmt!r} ({REFUSED_FORMATS.get(fmt, 'unknown to sparsepress')}; "
                         f"supported: {', '.join(SPARSE_FORMATS)})")
        if self.transform_config:
            found.append("a transform_config (rotations change what the weights mean)")
        return found


def matches(name: str, module: nn.Module, targets: list[str] | None) -> bool:
    """compressed-tensors' target rule: `re:` regexes match the module name from its start, other
    strings match the name exactly or the name of a class the module is an instance of.

    Example:
        >>> matches("model.layers.0.q_proj", nn.Linear(2, 2), ["re:.*q_proj$"]), matches("x", nn.Linear(2, 2), ["Linear"])
        (True, True)
    """
    for target in targets or ():
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target == name or any(cls.__name__ == target for cls in type(module).__mro__):
            return True
    return False


def scheme_of(config: CompressedTensorsConfig, name: str, module: nn.Module) -> tuple[str, Scheme] | None:
    """(group name, scheme) whose targets cover `module` and whose ignore list does not, or None."""
    if matches(name, module, config.ignore):
        return None
    for group, scheme in config.config_groups.items():
        if scheme.weights is not None and matches(name, module, scheme.targets):
            return group, scheme
    return None


def sparsity_structure(config: CompressedTensorsConfig, name: str, module: nn.Module) -> str | None:
    """The sparsity structure the config declares for `module` ('2:4', 'unstructured', ...), or None."""
    sparse = config.sparsity_config
    if sparse is None or matches(name, module, sparse.ignore):
        return None
    if sparse.targets is not None and not matches(name, module, sparse.targets):
        return None
    return (sparse.sparsity_structure or "unstructured").lower()
