"""Pass: calibrate per-layer activation-sparsity thresholds on the finished (compressed) model.

For every targeted Linear inside the blocks, the magnitudes of its inputs over the real calibration
tokens are sampled (up to `SAMPLES_PER_BATCH` per batch, seeded), and the threshold of level S is their
S-quantile: on calibration data a fraction S of the inputs falls below it and is zeroed at run time.
Layers still dense (nn.Linear) become dense fp32 SparseLinear so they can carry thresholds.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> import sparsepress as sp
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> recipe = sp.Recipe.model_validate({"stages": [{"activation_sparsity": {"sparsity": 0.4}}]})
    >>> model = sp.compress(model, recipe, calibration=[torch.randint(0, 100, (16,)) for _ in range(4)])
    >>> model.encoder.layer[0].output.dense.act_thresholds.shape
    torch.Size([4])
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models import replace_module
from ..nn import SparseLinear
from ..nn.activation import install_thresholds
from ..recipe import ActivationSparsityStage, Recipe
from .base import ORDER_FINISH, CompressionPass, register_pass
from .blocks import drop_padding, forward_kwargs, real_tokens
from .context import CompressionContext
from .selection import stage_targets

SAMPLES_PER_BATCH = 1 << 16  # input magnitudes kept per layer and batch: quantiles to ~0.4% per batch


def _targeted(ctx: CompressionContext, stage: ActivationSparsityStage) -> dict[str, nn.Module]:
    layout = ctx.layout
    candidates = [(n, m) for n, m in ctx.model.named_modules()
                  if isinstance(m, (nn.Linear, SparseLinear)) and layout.block_of(n) is not None and n]
    names = stage_targets(stage, [n for n, _ in candidates])  # type: ignore[arg-type]
    return {n: m for n, m in candidates if n in names}


def sample_input_magnitudes(ctx: CompressionContext, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """A seeded sample of |input| of each layer over the real calibration tokens (one model forward per batch)."""
    generator = torch.Generator().manual_seed(ctx.recipe.seed)
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    running: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            flat = drop_padding(x.reshape(-1, x.shape[-1]), running[0]).abs().reshape(-1).float()
            flat = flat[torch.isfinite(flat)]
            if flat.numel() > SAMPLES_PER_BATCH:
                flat = flat[torch.randint(0, flat.numel(), (SAMPLES_PER_BATCH,), generator=generator)]
            samples[name].append(flat)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        extra = forward_kwargs(ctx.model)
        with torch.no_grad():
            for index, batch in enumerate(ctx.batches):
                running[0] = real_tokens(batch)
                ctx.model(**batch, **extra)
                ctx.tick("calibrating activation thresholds", index + 1, len(ctx.batches))
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in samples.items()}


def thresholds_for(magnitudes: torch.Tensor, levels: list[float]) -> torch.Tensor:
    """The threshold of each level: the level-quantile of the magnitudes (0 where there are none).

    Example:
        >>> thresholds_for(torch.arange(101.0), [0.25, 0.5]).tolist()
        [25.0, 50.0]
    """
    if magnitudes.numel() == 0:
        return torch.zeros(len(levels))
    return torch.quantile(magnitudes.double(), torch.tensor(levels, dtype=torch.float64)).float()


@register_pass
class ActivationSparsityPass(CompressionPass):
    """Stores activation-sparsity thresholds on the targeted layers and starts the model at `sparsity`."""

    name = "activation_sparsity"
    handles = ("activation_sparsity",)
    order = ORDER_FINISH - 5  # on the final weights, before the embedding tables change
    runs_packed_model = True

    def __init__(self, stage: ActivationSparsityStage):
        self.stage = stage

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        stage = recipe.stage("activation_sparsity")
        return [cls(stage)] if stage is not None else []  # type: ignore[arg-type]

    def run(self, ctx: CompressionContext) -> None:
        layers = _targeted(ctx, self.stage)
        for name, layer in list(layers.items()):
            if isinstance(layer, nn.Linear):
                layers[name] = SparseLinear.from_linear(layer, format="dense", dtype="fp32")
                replace_module(ctx.model, name, layers[name])
                ctx.record.layers.setdefault(name, {"format": "dense", "dtype": "fp32"})
        ladder = self.stage.ladder
        magnitudes = sample_input_magnitudes(ctx, layers)
        thresholds = {name: thresholds_for(magnitudes[name], ladder) for name in layers}
        install_thresholds(ctx.model, thresholds, ladder, self.stage.sparsity)
        ctx.record.extra["activation_sparsity"] = {"levels": ladder, "default": self.stage.sparsity,
                                                   "layers": sorted(layers)}
