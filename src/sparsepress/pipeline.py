"""One-shot compression: the recipe's passes, planned and run in order on one model.

The passes live in `sparsepress.passes` (one module each: per-layer allocation, the block-sequential
layer solve, embedding quantization, ...); this module validates the call, runs them and prepares the
result for fast inference.

Example:
    >>> import torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> recipe = sp.Recipe.model_validate({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]})
    >>> ids = [torch.randint(0, 100, (16,)) for _ in range(4)]
    >>> model = sp.compress(model, recipe, calibration=ids)
    >>> model.sparsepress_record.layers["encoder.layer.0.output.dense"]["format"] in ("bitmask", "csr", "dense")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .attention import use_native_attention
from .errors import InputError
from .fusion import fuse_activations
from .models import convert_conv1d_, unfuse_experts_
from .nn.spilled import SpilledLinear
from .passes import CompressionContext, plan_passes
from .passes.context import Progress
from .recipe import Recipe
from .runtime import use_native_blocks
from .stream import StreamedWeights, check_streamable_run

NONFINITE_POLICIES = ("error", "skip")


def compress(
    model: nn.Module,
    recipe: Recipe | dict[str, Any],
    calibration: Sequence[str] | Sequence[torch.Tensor] | None = None,
    tokenizer: Any = None,
    *,
    samples: int = 128,
    seq_len: int = 128,
    batch_size: int = 8,
    progress: Progress | None = None,
    nonfinite: str = "error",
    checkpoint: Any = None,
    weights: StreamedWeights | None = None,
    spill: Any = None,
) -> nn.Module:
    """Compress `model` in place with `recipe` and return it (Linear layers become SparseLinear).

    `calibration` is a list of strings (tokenized with `tokenizer`), a list of token-id tensors, or
    None for windows of the bundled WikiText-2 sample. See the module docstring for an example.
    `nonfinite="skip"` zeroes NaN / Inf weights and drops NaN / Inf calibration tokens with a
    NonFiniteWarning naming the layer (default "error": PoisonedWeightError). `checkpoint` (a
    `sparsepress.checkpoint.Checkpoint`) saves each finished block and, when resuming, restores them.
    `weights` (with a skeleton `model`, both from `sparsepress.stream.open_streamed`) streams the
    model from disk block by block, for models larger than memory (see `sparsepress.stream`).
    `spill` (a `sparsepress.spill.BlockSpill`) writes each finished block's packed layers to disk as soon
    as it is solved and leaves `SpilledLinear` placeholders (no tensors) in its place, so memory does not
    grow with the blocks done: the model returned is then for `sp.save` only (inside the spill's `with`
    block); run the saved folder with `sp.load`. A recipe with a pass that runs the packed model after the
    solve (activation_sparsity) keeps its blocks in memory, `spill` or not.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise InputError("nonfinite", f"got {nonfinite!r}; allowed: {' | '.join(NONFINITE_POLICIES)}")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.model_validate(recipe)
    passes = plan_passes(recipe)  # refuses what no pass implements before any work
    check_streamable_run(model, recipe, passes, weights)
    torch.manual_seed(recipe.seed)
    model.eval()
    convert_conv1d_(model)
    unfuse_experts_(model)  # MoE: one Linear per expert matrix, so every pass reaches each expert
    if weights is not None:
        weights.load_before_blocks_(model)  # the embeddings; each block is read by the layer solve
    if any(step.runs_packed_model for step in passes):
        spill = None  # that pass needs every packed block in memory
    ctx = CompressionContext(model, recipe, calibration, tokenizer, samples=samples, seq_len=seq_len,
                             batch_size=batch_size, progress=progress, nonfinite=nonfinite, checkpoint=checkpoint,
                             weights=weights, spill=spill)
    for step in passes:
        step.run(ctx)
    if weights is not None:
        weights.load_rest_(model)  # whatever no pass read (blocks without a selected layer)
    model.sparsepress_record = ctx.record  # type: ignore[attr-defined]
    if any(isinstance(m, SpilledLinear) for m in model.modules()):
        return model  # placeholders cannot run: fusion and native plans come with sp.load
    fuse_activations(model)
    use_native_attention(model)
    use_native_blocks(model)
    return model
