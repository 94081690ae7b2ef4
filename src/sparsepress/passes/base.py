"""The shape of a compression run: registered passes, planned from the recipe, run in order.

A pass class says which recipe parts it handles (`handles`: stage kinds, or "budget") and, from a
recipe, which instances of itself run (`plan`); every instance has an `order` (lower runs first).
`plan_passes` refuses a recipe part that no registered pass handles, naming it.

Example:
    >>> from sparsepress.recipe import Recipe
    >>> recipe = Recipe.model_validate({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]})
    >>> [p.name for p in plan_passes(recipe)]
    ['allocation', 'layer_solve']
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, TypeVar

from ..errors import RecipeError
from ..recipe import Recipe
from .context import CompressionContext

# The order bands of the built-in passes (a pass may sit between them):
# model-level surgery first (experts, structured removal), then choosing per-layer targets
# (allocation, budgets), the block-sequential layer solve, recovery, and what is calibrated on the
# final weights (activation thresholds, embeddings).
ORDER_SURGERY = 10
ORDER_ALLOCATION = 30
ORDER_SOLVE = 50
ORDER_RECOVERY = 60
ORDER_FINISH = 80


class CompressionPass(ABC):
    """One step of `sp.compress`; subclasses register with `@register_pass`."""

    name: ClassVar[str]
    handles: ClassVar[tuple[str, ...]] = ()  # recipe stage kinds (or "budget") this pass implements
    order: float = ORDER_SOLVE
    # Whether the pass runs the packed model forward after the layer solve: finished blocks then stay in
    # memory rather than being spilled to disk (sparsepress.spill).
    runs_packed_model: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        """The instances of this pass that `recipe` needs (none when it asks for nothing of it).

        Raise RecipeError for what the recipe asks of this pass that it cannot do.
        """

    @abstractmethod
    def run(self, ctx: CompressionContext) -> None:
        """Do this step on `ctx.model` (in place), recording what it did in `ctx.record`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(order={self.order})"


PASSES: list[type[CompressionPass]] = []
P = TypeVar("P", bound=type[CompressionPass])


def register_pass(cls: P) -> P:
    """Class decorator: make `cls` part of every run's planning.

    Example:
        >>> @register_pass
        ... class _Nothing(CompressionPass):
        ...     name = "nothing"
        ...     @classmethod
        ...     def plan(cls, recipe): return []
        ...     def run(self, ctx): pass
        >>> PASSES.remove(_Nothing)
    """
    if any(existing.name == cls.name for existing in PASSES):
        raise ValueError(f"a pass named {cls.name!r} is already registered")
    PASSES.append(cls)
    return cls


def _asked(recipe: Recipe) -> list[str]:
    kinds = [stage.kind for stage in recipe.stages]  # type: ignore[attr-defined]
    return kinds + (["budget"] if recipe.budget is not None else [])


def plan_passes(recipe: Recipe) -> list[CompressionPass]:
    """The passes `recipe` needs, in run order; RecipeError naming a stage no pass implements."""
    handled = {kind for cls in PASSES for kind in cls.handles}
    for kind in _asked(recipe):
        if kind not in handled:
            where = "budget" if kind == "budget" else f"stages.{kind}"
            available = " | ".join(sorted(handled - {"budget"}))
            raise RecipeError(where, kind, f"{available} ({kind} is not available in this version)")
    planned = [instance for cls in PASSES for instance in cls.plan(recipe)]
    return sorted(planned, key=lambda p: p.order)
