"""Pass: distillation (the `distill` stage), between the prune solve and the quantize solve.

The teacher is the dense model as it came in: `TeacherSnapshotPass` (first of all passes) keeps a
copy in `ctx.teacher`, which costs one more copy of the dense model in memory (MiniLM ~90 MB, the tiny
LLaMA ~20 MB; a 7B model 28 GB in fp32). The student is the model after structured removal and
pruning, its masks (`ctx.masks`) fixed; student block i is matched to the teacher block it came from
(the structured record's source indices).

Example:
    >>> import torch
    >>> from sparsepress.recipe import Recipe
    >>> recipe = Recipe.model_validate({"stages": [{"prune": {"sparsity": 0.5}}, {"distill": {"steps": 2}},
    ...                                            {"quantize": {}}]})
    >>> from sparsepress.passes import plan_passes
    >>> [(p.name, int(p.order)) for p in plan_passes(recipe)]
    [('teacher', 0), ('allocation', 30), ('layer_solve', 50), ('distill', 60), ('layer_solve', 70)]
"""

from __future__ import annotations

import copy

from ..distill import distill_
from ..recipe import DistillStage, Recipe
from .base import ORDER_RECOVERY, CompressionPass, register_pass
from .layer_solve import gradual_order
from .context import CompressionContext


class TeacherSnapshotPass(CompressionPass):
    """Keeps a copy of the model as it came in (`ctx.teacher`); planned by DistillPass."""

    name = "teacher"
    order = 0

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        return []

    def run(self, ctx: CompressionContext) -> None:
        ctx.teacher = copy.deepcopy(ctx.model).eval()


@register_pass
class DistillPass(CompressionPass):
    """Fine-tunes the compressed (not yet quantized) model toward the dense teacher."""

    name = "distill"
    handles = ("distill",)
    order = ORDER_RECOVERY

    def __init__(self, stage: DistillStage, round_: int = 1):
        self.stage, self.round = stage, round_
        self.order = gradual_order(round_, stage.rounds, "distill")

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        """One instance per gradual round, after that round's prune solve; each runs its share of the
        steps (with its own warmup and schedule)."""
        stage = recipe.distill
        if stage is None:
            return []
        share, extra = divmod(stage.steps, stage.rounds)
        rounds = [stage.model_copy(update={"steps": share + (extra if r == stage.rounds else 0)}) if stage.rounds > 1
                  else stage for r in range(1, stage.rounds + 1)]
        return [TeacherSnapshotPass(), *(cls(s, r) for r, s in zip(range(1, stage.rounds + 1), rounds))]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(round={self.round}, steps={self.stage.steps}, order={self.order})"

    def run(self, ctx: CompressionContext) -> None:
        if ctx.teacher is None:
            raise RuntimeError("distillation needs the teacher snapshot (TeacherSnapshotPass runs first)")
        structured = ctx.record.extra.get("structured")
        block_map = [b["source_index"] for b in structured["blocks"]] if structured else None
        checkpoint = ctx.open_checkpoint() if ctx.checkpoint is not None else None
        pad_id = getattr(ctx.tokenizer, "pad_token_id", None) or 0
        history = distill_(ctx.model, ctx.teacher, ctx.token_ids, self.stage, masks=ctx.masks, block_map=block_map,
                           seed=ctx.recipe.seed + self.round - 1, pad_id=pad_id, progress=ctx.tick,
                           checkpoint=checkpoint, checkpoint_prefix=f"r{self.round}-" if self.round > 1 else "")
        record = ctx.record.extra.setdefault(self.name, {"steps": 0, "rounds": []})
        record["steps"] += self.stage.steps
        record["rounds"].append({"steps": self.stage.steps, "first_loss": history[0] if history else None,
                                 "last_loss": history[-1] if history else None})
        record["last_loss"] = history[-1] if history else None
        if self.round == self.stage.rounds:
            ctx.teacher = None  # the dense copy is not needed past recovery
