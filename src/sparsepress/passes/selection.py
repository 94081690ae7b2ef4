"""Which Linear layers a recipe compresses: those inside the model's blocks that its prune / quantize
stages target (regexes fully matching the layer names) and do not ignore.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.recipe import Recipe
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100))
    >>> recipe = Recipe.model_validate({"stages": [{"prune": {"sparsity": 0.5, "targets": [".*dense"]}}]})
    >>> sorted(select_layers(model, recipe).prune_targets)
    ['encoder.layer.0.attention.output.dense', 'encoder.layer.0.intermediate.dense', 'encoder.layer.0.output.dense']
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import NonFiniteWarning, PoisonedWeightError, RecipeError
from ..memory import release_file_pages
from ..models import find_layout, linear_layers, router_names
from ..recipe import PruneStage, QuantizeStage, Recipe


@dataclass
class LayerSelection:
    """The layers a run compresses (by qualified name) and which stages apply to each."""

    layers: dict[str, nn.Linear]
    prune_targets: set[str]
    quant_targets: set[str]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def stage_targets(stage: PruneStage | QuantizeStage | None, names: list[str]) -> set[str]:
    """The names a stage's `targets` select minus its `ignore`; RecipeError for a target matching none.

    Example:
        >>> stage_targets(QuantizeStage(targets=["a.*"]), ["a1", "b1"])
        {'a1'}
    """
    if stage is None:
        return set()
    for pattern in stage.targets:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise RecipeError(f"{stage.kind}.targets", pattern, "a regex fully matching a Linear layer name, e.g. " + (names[0] if names else "<none>"))  # type: ignore[attr-defined]
    return {n for n in names if _matches(n, stage.targets) and not _matches(n, stage.ignore)}


def zero_nonfinite_(name: str, what: str, tensor: torch.Tensor) -> None:
    """nonfinite='skip': NaN / Inf entries become zeros (pruned), with a warning naming the layer.

    Example:
        >>> t = torch.tensor([1.0, float("inf")])
        >>> with warnings.catch_warnings(record=True):
        ...     zero_nonfinite_("fc", "weight", t)
        >>> t.tolist()
        [1.0, 0.0]
    """
    with torch.no_grad():
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        tensor[bad] = 0.0
    warnings.warn(f"{name}: zeroed {count} NaN or Inf entries of its {what}", NonFiniteWarning, stacklevel=3)


def check_weights_finite(layers: dict[str, nn.Linear], nonfinite: str = "error") -> None:
    """PoisonedWeightError naming the first layer with NaN / Inf (nonfinite='skip': zero them instead)."""
    for name, layer in layers.items():
        for what, tensor in (("weight", layer.weight), ("bias", layer.bias)):
            if tensor is None or tensor.is_meta:  # streamed: checked when its block is read from disk
                continue
            if bool(torch.isfinite(tensor).all()):
                # The check read every page of a memory-mapped weight; unmodified, those pages can go
                # back to the file until this layer's block is compressed, keeping RSS near one block.
                release_file_pages([tensor])
                continue
            if nonfinite != "skip":
                raise PoisonedWeightError(name, what)
            zero_nonfinite_(name, what, tensor)


def select_layers(model: nn.Module, recipe: Recipe, nonfinite: str = "error") -> LayerSelection:
    """The Linear layers inside `model`'s blocks that `recipe` prunes or quantizes, weights checked finite."""
    layout = find_layout(model)
    routers = router_names(model)  # MoE routers and shared-expert gates stay dense
    in_blocks = [(n, layer) for n, layer in linear_layers(model) if layout.block_of(n) is not None and n not in routers]
    names = [n for n, _ in in_blocks]
    prune_targets = stage_targets(recipe.prune, names)
    quant_targets = stage_targets(recipe.quantize, names)
    layers = {n: layer for n, layer in in_blocks if n in prune_targets | quant_targets}
    check_weights_finite(layers, nonfinite)
    return LayerSelection(layers=layers, prune_targets=prune_targets, quant_targets=quant_targets)
