"""Pass: structured removal (prune stages with pattern channel | head | layer), before anything else
sees the model's layers, so allocation, the layer solve and distillation all work on the smaller model.

The record (`structured.StructuredRecord.to_json`) lands in the folder manifest under `structured`.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.recipe import Recipe
    >>> from sparsepress.passes.context import CompressionContext
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> recipe = Recipe.model_validate({"stages": [{"prune": {"pattern": "layer", "sparsity": 0.34}}]})
    >>> ctx = CompressionContext(model, recipe, calibration=[torch.randint(0, 100, (8,)) for _ in range(2)])
    >>> StructuredPass.plan(recipe)[0].run(ctx)
    >>> len(model.encoder.layer), model.config.num_hidden_layers, ctx.record.extra["structured"]["plain_config"]
    (2, 2, True)
"""

from __future__ import annotations

from ..recipe import PruneStage, Recipe
from ..structured import remove_structure_
from .base import ORDER_SURGERY, CompressionPass, register_pass
from .context import CompressionContext


@register_pass
class StructuredPass(CompressionPass):
    """Removes FFN channels, attention heads or whole blocks for real (shapes and config change)."""

    name = "structured"
    handles = ("prune",)
    order = ORDER_SURGERY

    def __init__(self, stages: list[PruneStage]):
        self.stages = stages

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        return [cls(recipe.structured)] if recipe.structured else []

    def run(self, ctx: CompressionContext) -> None:
        record = remove_structure_(ctx.model, self.stages, ctx.batches, seed=ctx.recipe.seed, progress=ctx.tick)
        ctx.record.extra[self.name] = record.to_json()
