"""Pass: embedding tables quantized row-wise (`quantize_embeddings`), after the layer solve; with
`head: true` the LM head (output embeddings) too, optionally Wanda-pruned first (`head_sparsity`).

The head becomes a SparseLinear (int8 / int4, one scale per row: dense, or bitmask when pruned) run by
the native kernels. A head tied to the input embedding is quantized once: the QuantizedEmbedding reads
the head's own codes and scales. Without `head`, tables tied to an output Linear and nn.Embedding
subclasses with a forward of their own are left as they are, and the record says why.

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

from ..errors import PoisonedWeightError, RecipeError
from ..formats import BitmaskWeight, DenseWeight
from ..models import replace_module
from ..nn import QuantizedEmbedding, SparseLinear
from ..prune.masks import count_pruned, prune_lowest
from ..prune.stats import LayerStats
from ..prune.wanda import score_wanda
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
        shared = self._compress_head(ctx) if self.stage.head else {}
        tables, skipped = quantizable_embeddings(model)
        for name, why in skipped.items():
            ctx.record.embeddings[name] = {"bits": None, "skipped": why}
        for name, embedding in tables.items():
            if id(embedding.weight) in shared:  # tied to the head just packed: read the head's own codes
                head_name, head = shared[id(embedding.weight)]
                replace_module(model, name, QuantizedEmbedding.from_packed(head.packed, embedding.padding_idx))
                ctx.record.embeddings[name] = {"bits": self.stage.bits, "shape": list(embedding.weight.shape),
                                               "tied_to": head_name}
                continue
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

    def _compress_head(self, ctx: CompressionContext) -> dict[int, tuple[str, SparseLinear]]:
        """Quantize (and prune) the output head in place; id(weight) -> (name, head) when an input
        embedding shares that weight (tied)."""
        model = ctx.model
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if not isinstance(head, nn.Linear):
            ctx.record.embeddings["<output embeddings>"] = {"bits": None, "skipped": "the model has no output Linear"}
            return {}
        name = next(n for n, m in model.named_modules() if m is head)
        tied = any(isinstance(m, nn.Embedding) and m.weight is head.weight for m in model.modules())
        weight = head.weight.detach().float()
        if not bool(torch.isfinite(weight).all()):
            raise PoisonedWeightError(name, "weight")
        sparsity = self.stage.head_sparsity
        if sparsity > 0:
            if tied:
                raise RecipeError("quantize_embeddings.head_sparsity", sparsity,
                                  f"0 for a head tied to the input embedding ({name} is): pruning it would prune the embedding rows")
            weight = weight.masked_fill(prune_lowest(score_wanda(weight, _head_inputs(ctx, head)),
                                                     count_pruned(weight.shape[1], sparsity)), 0.0)
        dtype = f"int{self.stage.bits}"
        packed = (BitmaskWeight if sparsity > 0 else DenseWeight).pack(weight, dtype=dtype)
        packed_head = SparseLinear(packed, head.bias)
        replace_module(model, name, packed_head)
        ctx.record.layers[name] = {**packed.meta(), "method": "wanda" if sparsity > 0 else None,
                                   "pattern": "unstructured" if sparsity > 0 else None,
                                   "target_sparsity": sparsity or None, "quant_method": "rtn", "block": None}
        return {id(head.weight): (name, packed_head)} if tied else {}


def _head_inputs(ctx: CompressionContext, head: nn.Linear) -> LayerStats:
    """Statistics of the head's inputs (the final hidden states) over the calibration's real tokens."""
    stats = LayerStats(head.in_features, name="head")
    running: list[torch.Tensor | None] = [None]

    def record(_module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, head.in_features).float()
        keep = running[0]
        stats.add(x[keep] if keep is not None and keep.numel() == x.shape[0] else x)

    handle = head.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            for batch in ctx.batches:
                mask = batch.get("attention_mask")
                running[0] = None if mask is None else mask.reshape(-1).bool()
                ctx.model(**batch, **({"use_cache": False} if _takes_cache(ctx.model) else {}))
    finally:
        handle.remove()
    return stats


def _takes_cache(model: nn.Module) -> bool:
    import inspect

    return "use_cache" in inspect.signature(model.forward).parameters
