"""The passes of a compression run, one module each; importing this package registers them all.

`sparsepress.pipeline.compress` plans the passes a recipe needs (`plan_passes`) and runs them in order
on one `CompressionContext`. To add a step, write a module here with a `CompressionPass` subclass
decorated with `@register_pass` and import it below.

Example:
    >>> from sparsepress.recipe import Recipe
    >>> recipe = Recipe.model_validate({"stages": [{"quantize": {"method": "rtn"}}, {"quantize_embeddings": {}}]})
    >>> [p.name for p in plan_passes(recipe)]
    ['layer_solve', 'embeddings']
"""

from . import activation, allocation, budget, distill, embeddings, experts, layer_solve, structured  # noqa: F401  (registration)
from .base import PASSES, CompressionPass, plan_passes, register_pass
from .context import CompressionContext, CompressionRecord

__all__ = ["PASSES", "CompressionContext", "CompressionPass", "CompressionRecord", "plan_passes", "register_pass"]
