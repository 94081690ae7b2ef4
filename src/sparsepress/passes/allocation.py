"""Pass: each pruned layer's target sparsity around the recipe's mean (`prune.allocation`).

`uniform` gives every layer the mean; `owl` and `sensitivity` read each layer's input norms from one
forward pass of the dense model over the calibration batches (prune/allocation.py does the math).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.recipe import Recipe
    >>> from sparsepress.passes.context import CompressionContext
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> recipe = Recipe.model_validate({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]})
    >>> ctx = CompressionContext(model, recipe)
    >>> AllocationPass.plan(recipe)[0].run(ctx)
    >>> sorted({t.sparsity for t in ctx.targets.values()})
    [0.5]
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..prune.allocation import LayerSummary, allocate_sparsity
from ..recipe import Recipe
from .base import ORDER_ALLOCATION, CompressionPass, register_pass
from .blocks import finite_rows, forward_kwargs, real_tokens, warn_dropped
from .context import CompressionContext, LayerTarget


def input_norms(ctx: CompressionContext, names: list[str]) -> dict[str, torch.Tensor]:
    """Squared L2 norm of each input feature of layers `names` over the real calibration tokens,
    from one forward of the whole model per batch (float64)."""
    layers = ctx.selection.layers
    norms = {name: torch.zeros(layers[name].in_features, dtype=torch.float64) for name in names}
    running: list[torch.Tensor | None] = [None]  # the real tokens of the batch being run

    def hook_for(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = finite_rows(name, [args[0]], ctx.nonfinite, ctx.dropped, running[0])[0].double()
            norms[name] += (x * x).sum(dim=0)
        return hook

    handles = [layers[name].register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        extra = forward_kwargs(ctx.model)
        for index, batch in enumerate(ctx.batches):
            running[0] = real_tokens(batch)
            with torch.no_grad():
                ctx.model(**batch, **extra)
            ctx.tick("allocating", index + 1, len(ctx.batches))
    finally:
        for handle in handles:
            handle.remove()
    warn_dropped(ctx.dropped)
    return norms


@register_pass
class AllocationPass(CompressionPass):
    """Sets `ctx.targets[name]` (its sparsity, or its nested elastic levels) for every layer the prune stage
    targets; with elastic levels each level is allocated around its own mean."""

    name = "allocation"
    order = ORDER_ALLOCATION

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        return [cls()] if recipe.prune is not None and recipe.budget is None else []

    def run(self, ctx: CompressionContext) -> None:
        prune = ctx.recipe.prune
        assert prune is not None
        means = prune.layer_sparsity_levels
        targets = sorted(ctx.selection.prune_targets)
        if prune.allocation == "uniform":
            per_level = [{name: mean for name in targets} for mean in means]
        else:
            norms = input_norms(ctx, targets)
            layout = ctx.layout
            summaries = [
                LayerSummary(name=name, weight=ctx.selection.layers[name].weight.detach(),
                             act_norm_sq=norms[name].float(), block=layout.block_of(name))
                for name in targets
            ]
            per_level = [allocate_sparsity(prune.allocation, summaries, mean, prune) for mean in means]
        if len(means) == 1:
            ctx.targets = {name: LayerTarget(sparsity=per_level[0][name]) for name in targets}
        else:
            ctx.targets = {name: LayerTarget(levels=increasing([level[name] for level in per_level]))
                           for name in targets}


def increasing(values: list[float], step: float = 1e-3) -> tuple[float, ...]:
    """`values` made strictly increasing (each at least `step` above the one before), below 1.

    Example:
        >>> increasing([0.5, 0.5, 0.7])
        (0.5, 0.501, 0.7)
    """
    out: list[float] = []
    for value in values:
        out.append(min(max(value, out[-1] + step) if out else value, 0.999))
    return tuple(out)
