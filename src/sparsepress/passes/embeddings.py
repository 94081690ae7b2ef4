"""Pass: embedding tables quantized row-wise (`quantize_embeddings`), after the layer solve.

Tables tied to an output Linear and nn.Embedding subclasses with a forward of their own are left as
they are, and the record says why.

Example:
    >>> import torch
    >>> from sparsepress.recipe import Recipe
    >>> from sparsepress.passes.context import CompressionContext
    >>> model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    >>> recipe = Recipe.model_validate({"stages": [{"quantize_embeddings": {"bits": 8}}]})
    >>> ctx = CompressionContext(model, recipe)
    >>> EmbeddingsPass.plan(recipe)[0].run(ctx)
    >>> type(model[0]).__name__, ctx.record.embeddings["0"]["bits"]
    ('QuantizedEmbedding', 8)
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import PoisonedWeightError
from ..models import replace_module
from ..nn import QuantizedEmbedding
from ..recipe import QuantizeEmbeddingsStage, Recipe
from .base import ORDER_FINISH, CompressionPass, register_pass
from .context import CompressionContext
from .selection import zero_nonfinite_


def quantizable_embeddings(model: nn.Module) -> tuple[dict[str, nn.Embedding], dict[str, str]]:
    """The plain embedding tables a quantize_embeddings stage replaces, and why the others stay as they are.

    Example:
        >>> tables, skipped = quantizable_embeddings(torch.nn.Sequential(torch.nn.Embedding(4, 2)))
        >>> sorted(tables), skipped
        (['0'], {})
    """
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tables: dict[str, nn.Embedding] = {}
    skipped: dict[str, str] = {}
    for name, embedding in model.named_modules():
        if not isinstance(embedding, nn.Embedding):
            continue
        if id(embedding.weight) in tied:
            # Tied to an output head: quantizing one copy would silently untie them.
            skipped[name] = "tied to an output Linear"
        elif type(embedding).forward is not nn.Embedding.forward:
            # Subclasses with their own forward (OPT's learned positions take an offset and
            # position_ids) would lose that behaviour inside a plain lookup table.
            skipped[name] = f"custom forward ({type(embedding).__name__})"
        else:
            tables[name] = embedding
    return tables, skipped


@register_pass
class EmbeddingsPass(CompressionPass):
    """Replaces each plain nn.Embedding by a QuantizedEmbedding of the stage's bits (or of the bits a
    budget's allocation chose for it, in `ctx.embedding_bits`; 32 leaves it unquantized)."""

    name = "embeddings"
    handles = ("quantize_embeddings",)
    order = ORDER_FINISH

    def __init__(self, stage: QuantizeEmbeddingsStage):
        self.stage = stage

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        stage = recipe.stage("quantize_embeddings")
        if stage is None and recipe.budget is not None:
            stage = QuantizeEmbeddingsStage()  # the allocation chooses each table's bits
        return [cls(stage)] if stage is not None else []  # type: ignore[arg-type]

    def run(self, ctx: CompressionContext) -> None:
        model = ctx.model
        tables, skipped = quantizable_embeddings(model)
        for name, why in skipped.items():
            ctx.record.embeddings[name] = {"bits": None, "skipped": why}
        for name, embedding in tables.items():
            bits = ctx.embedding_bits.get(name, self.stage.bits)
            if bits == 32:
                ctx.record.embeddings.pop(name, None)
                continue
            if not torch.isfinite(embedding.weight).all():
                if ctx.nonfinite != "skip":
                    raise PoisonedWeightError(name, "embedding table")
                zero_nonfinite_(name, "embedding table", embedding.weight)
            replace_module(model, name, QuantizedEmbedding.from_embedding(embedding, bits=bits))
            ctx.record.embeddings[name] = {"bits": bits, "shape": list(embedding.weight.shape)}
