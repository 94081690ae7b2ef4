"""Passes of the `experts:` stage (mixture-of-experts models): routing statistics and expert removal or
merging first (model surgery), per-expert sparsity allocation after the per-layer one, and adaptive
routing calibrated on the finished model.

Example:
    >>> import torch, sparsepress as sp
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, norm_topk_prob=True,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> recipe = sp.Recipe.model_validate({"stages": [{"experts": {"prune": 0.25, "by": "frequency"}}]})
    >>> [p.name for p in sp.passes.plan_passes(recipe)]
    ['experts']
    >>> model = sp.compress(Qwen3MoeForCausalLM(config).eval(), recipe, calibration=[torch.randint(0, 64, (16,))])
    >>> model.config.num_experts, len(model.model.layers[0].mlp.experts)
    (3, 3)
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import RecipeError
from ..experts.adaptive import calibrate_routing, choose_top_p, set_routing
from ..experts.allocation import allocate_by_usage
from ..experts.record import ExpertsRecord
from ..experts.routing import collect_routing
from ..experts.surgery import remove_experts_
from ..models.moe import find_moe_layers
from ..recipe import ExpertsStage, Recipe
from .base import ORDER_ALLOCATION, ORDER_FINISH, ORDER_SURGERY, CompressionPass, register_pass
from .context import CompressionContext


def _stage(recipe: Recipe) -> ExpertsStage | None:
    return recipe.stage("experts")  # type: ignore[return-value]


def _record(ctx: CompressionContext) -> ExpertsRecord:
    return ctx.record.extra.setdefault("experts", ExpertsRecord())


@register_pass
class ExpertsPass(CompressionPass):
    """Routing statistics of the dense model; removes or merges `prune` of each MoE layer's experts."""

    name = "experts"
    handles = ("experts",)
    order = ORDER_SURGERY

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        return [cls()] if _stage(recipe) is not None else []

    def run(self, ctx: CompressionContext) -> None:
        stage = _stage(ctx.recipe)
        assert stage is not None
        if not find_moe_layers(ctx.model):
            raise RecipeError("stages.experts", type(ctx.model).__name__,
                              "a mixture-of-experts model (mixtral, qwen2_moe, qwen3_moe, olmoe)")
        routing = collect_routing(ctx.model, ctx.batches, reap=stage.by == "reap" or stage.prune == 0,
                                  progress=lambda done, total: ctx.tick("routing statistics", done, total))
        record = _record(ctx)
        record.routing = routing
        if stage.prune > 0:
            record.by = stage.by
            record.removed = remove_experts_(ctx.model, routing, stage.prune, stage.by, stage.merge, ctx.recipe.seed)


@register_pass
class ExpertAllocationPass(CompressionPass):
    """Spreads each MoE layer's pruning targets over its experts by usage (`allocation: usage`)."""

    name = "expert_allocation"
    order = ORDER_ALLOCATION + 1

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        stage = _stage(recipe)
        if stage is None or stage.allocation != "usage":
            return []
        if recipe.prune is None:
            raise RecipeError("stages.experts.allocation", "usage", "uniform (usage allocation spreads a prune stage's sparsity)")
        if recipe.prune.parsed_pattern.kind == "nm":
            raise RecipeError("stages.experts.allocation", "usage", f"uniform (the fixed pattern {recipe.prune.pattern} cannot vary sparsity per expert)")
        return [cls()]

    def run(self, ctx: CompressionContext) -> None:
        stage = _stage(ctx.recipe)
        assert stage is not None
        routing = _record(ctx).routing
        layers = {layer.name: (layer.experts_name, routing[layer.name])
                  for layer in find_moe_layers(ctx.model) if layer.name in routing}
        single = {name: t.sparsity for name, t in ctx.targets.items() if t.sparsity is not None and not t.elastic}
        allocated = allocate_by_usage(single, layers, stage.usage_temperature)
        ctx.targets.update({name: replace(ctx.targets[name], sparsity=value) for name, value in allocated.items()})


@register_pass
class RoutingPass(CompressionPass):
    """Measures top_p operating points on the finished model and sets the stage's top_p (or `auto`'s pick)."""

    name = "routing"
    order = ORDER_FINISH + 5

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        stage = _stage(recipe)
        return [cls()] if stage is not None and stage.top_p is not None else []

    def run(self, ctx: CompressionContext) -> None:
        stage = _stage(ctx.recipe)
        assert stage is not None and stage.top_p is not None
        points = calibrate_routing(ctx.model, ctx.batches)
        chosen = choose_top_p(points, stage.max_loss_rise) if stage.top_p == "auto" else float(stage.top_p)
        set_routing(ctx.model, chosen)
        record = _record(ctx)
        record.points = points
        record.top_p = chosen
        record.max_loss_rise = stage.max_loss_rise
        ctx.model.sparsepress_routing_levels = record.levels  # type: ignore[attr-defined]
