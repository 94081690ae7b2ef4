"""Pass: the block-sequential layer solve (prune and quantize stages) — memory bounded by one block.

Block i's inputs are captured, its Linear layers see calibration statistics (in the order they run,
each on the inputs the already compressed layers produce, paired with a dense twin's when the solve
aims at the dense model) and are compressed and packed; then its outputs are recomputed with the
compressed weights and fed to block i+1. Finished blocks are checkpointed when the run has one.

Example:
    >>> import torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> recipe = sp.Recipe.model_validate({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]})
    >>> ids = [torch.randint(0, 100, (16,)) for _ in range(4)]
    >>> model = sp.compress(model, recipe, calibration=ids)
    >>> type(model.encoder.layer[0].attention.self.query).__name__
    'SparseLinear'
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..errors import InputError, PoisonedWeightError, RecipeError
from ..experts.calibration import layer_calibration
from ..memory import release_file_pages, trim_heap
from ..models import replace_module
from ..native import release_cached_outputs
from ..packing import choose_packing
from ..prune.solve import compress_weight
from ..prune.stats import LayerStats
from ..recipe import Recipe
from .base import ORDER_SOLVE, CompressionPass, register_pass
from .block_checkpoint import BlockCheckpoint
from .blocks import (
    BlockInputs,
    advance,
    capture_block_inputs,
    collecting,
    finite_rows,
    hidden_in,
    layer_inputs,
    model_inputs,
    run_block,
    shared_inputs,
    warn_dropped,
    with_hidden,
)
from .context import CompressionContext

# Methods that read the calibration inputs of each layer; the others need no forward pass per block.
CALIBRATED_PRUNE_METHODS = ("wanda", "sparsegpt")
CALIBRATED_QUANT_METHODS = ("gptq",)


def needs_statistics(recipe: Recipe) -> bool:
    """Whether any asked method reads calibration statistics (magnitude and RTN are data-free).

    Example:
        >>> needs_statistics(Recipe.model_validate({"stages": [{"quantize": {"method": "rtn"}}]}))
        False
    """
    prune, quant = recipe.prune, recipe.quantize
    return (prune is not None and prune.method in CALIBRATED_PRUNE_METHODS) or (
        quant is not None and quant.method in CALIBRATED_QUANT_METHODS)


class BlockSolver:
    """Solves one block's layers at a time; holds the per-run state so functions stay explicit."""

    def __init__(self, ctx: CompressionContext):
        self.ctx = ctx
        self.recipe = ctx.recipe
        self.prune, self.quant = ctx.recipe.prune, ctx.recipe.quantize
        selection = ctx.selection
        self.layers: dict[str, nn.Module] = dict(selection.layers)
        self.prune_targets, self.quant_targets = selection.prune_targets, selection.quant_targets
        self.layout = ctx.layout
        self.needs_stats = needs_statistics(ctx.recipe)
        # Whether the run carries the dense model's activations (calibrated solves that aim at it).
        self.follows_dense = self.needs_stats and ctx.recipe.solver.follows_dense_model
        # The dense model's inputs to the current block (a dense twin of each block produces the next).
        self.dense_inputs: list[BlockInputs] = []
        # What the model family adds to the statistics (MoE: per-expert routing, pooling of cold experts).
        experts = ctx.recipe.stage("experts")
        self.calibration = layer_calibration(ctx.model, getattr(experts, "min_tokens", None))

    def compress_block(self, block_name: str, block: nn.Module, inputs: list[BlockInputs]) -> list[BlockInputs]:
        """Compress the targeted layers of `block`; returns the inputs of the next block."""
        prefix = f"{block_name}." if block_name else ""
        members = {n: layer for n, layer in self.layers.items() if n.startswith(prefix) or not block_name}
        release_cached_outputs()  # output blocks the last block's forward left for reuse: not this peak's
        with torch.no_grad():
            # The dense twin runs beside the block being compressed so each layer can be aimed at the
            # dense model's outputs; it is one block (or, with no blocks, the model) at a time.
            dense_block = copy.deepcopy(block) if self.follows_dense and members else None
            dense_weights = [layer.weight for layer in members.values()]
            for group in self._solve_groups(block, members, inputs):
                stats = self._group_stats(prefix, block, dense_block, group, inputs) if self.needs_stats else {}
                for name in group:
                    layer_stats = stats.get(name)
                    if layer_stats is not None and layer_stats.n_tokens == 0 and self.ctx.nonfinite == "skip":
                        raise PoisonedWeightError(name, "calibration activations (every calibration token was dropped)")
                    self._compress_layer(name, members[name], layer_stats)
            release_file_pages(dense_weights)
            del dense_weights
            trim_heap()
            if dense_block is not None and block_name:
                self.dense_inputs = advance(dense_block, self.dense_inputs)
            del dense_block
            return inputs if block_name == "" else advance(block, inputs)

    def _solve_groups(self, block: nn.Module, members: dict[str, nn.Module],
                      inputs: list[BlockInputs]) -> list[list[str]]:
        """Layers in the order they run, those fed the very same tensor (q, k, v) in one group.

        Not sequential (or no calibration): one group, every layer seeing the block's dense inputs.
        Layers the block never calls come last (their solve then names them: no calibration tokens).
        """
        if not (self.needs_stats and self.recipe.solver.sequential) or not members:
            return [list(members)] if members else []
        seen = layer_inputs(block, members, inputs[0])  # first calls, in the order they run
        ordered = [[owner, *names] for owner, names in shared_inputs(seen).items()]
        called = {name for names in ordered for name in names}
        unseen = [name for name in members if name not in called]
        return self.calibration.solve_groups(ordered + ([unseen] if unseen else []))

    def _group_stats(self, prefix: str, block: nn.Module, dense_block: nn.Module | None, group: list[str],
                     inputs: list[BlockInputs]) -> dict[str, LayerStats]:
        """Calibration statistics of `group`'s inputs as the block now runs (earlier groups compressed),
        paired with the dense twin's inputs when the solve aims at the dense model."""
        ctx = self.ctx
        layers = {name: ctx.model.get_submodule(name) for name in group}
        stats = {name: LayerStats(layer.in_features, name=name) for name, layer in layers.items()}
        with self.calibration.pass_over(block, dense_block) as begin_batch:
            if dense_block is None:
                running: list[torch.Tensor | None] = [None]
                with collecting(layers, stats, ctx.nonfinite, ctx.dropped, lambda: running[0]):
                    for item in inputs:
                        running[0] = item.tokens
                        begin_batch(item.tokens)
                        run_block(block, item)
            else:
                dense_layers = {n: dense_block.get_submodule(n[len(prefix):]) for n in group}
                for item, dense_item in zip(inputs, self.dense_inputs):
                    begin_batch(item.tokens)
                    seen = layer_inputs(block, layers, item)
                    dense_seen = layer_inputs(dense_block, dense_layers, dense_item)
                    for owner, names in shared_inputs(seen).items():
                        x, dense_x = finite_rows(owner, [seen[owner], dense_seen[owner]], ctx.nonfinite, ctx.dropped,
                                                 item.tokens)
                        stats[owner].add(x, dense_x)
                        for name in names:
                            stats[name] = stats[owner]
        warn_dropped(ctx.dropped)
        return self.calibration.finish(block, stats, inputs)

    def _compress_layer(self, name: str, layer: nn.Linear, stats: LayerStats | None) -> None:
        prune = self.prune if name in self.prune_targets else None
        quant = self.quant if name in self.quant_targets else None
        sparsity = self.ctx.sparsity.get(name) if prune is not None else None
        weight = layer.weight.detach().float()
        if stats is not None and stats.tracks_dense:
            weight = stats.dense_target(weight, self.recipe.solver.dense_target,
                                        (prune or quant).dampening)  # type: ignore[union-attr]
        refit = self.recipe.solver.refit and stats is not None
        result = compress_weight(weight, stats, prune=prune, sparsity=sparsity, quant=quant, refit=refit,
                                 mask_search=self.recipe.solver.mask_search, name=name)
        sparse_layer, meta = choose_packing(layer, result, prune, self.recipe.format)
        if stats is not None and stats.tracks_dense and self.recipe.solver.bias_correction and sparse_layer.bias is not None:
            # A new tensor: the packed layer's bias may share the (possibly memory-mapped) dense one's storage.
            sparse_layer.bias = sparse_layer.bias + stats.bias_gap(layer.weight.detach(), result.weight)
            meta["bias_corrected"] = True
        replace_module(self.ctx.model, name, sparse_layer)
        # Let the dense weight go now: keeping every dense Linear here until the run ends would hold
        # dense and packed copies of the whole model at once.
        self.layers[name] = sparse_layer
        meta.update(
            method=prune.method if prune else None,
            pattern=prune.pattern if prune else None,
            target_sparsity=sparsity,
            quant_method=quant.method if quant else None,
            block=self.layout.block_of(name),
        )
        self.ctx.record.layers[name] = meta

    def block_layers(self, index: int) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
        """The compressed layers of block `index` and their record entries (for checkpoints)."""
        record = self.ctx.record.layers
        names = [n for n, meta in record.items() if meta.get("block") == index]
        return {n: self.ctx.model.get_submodule(n) for n in names}, {n: record[n] for n in names}

    def restore(self, finished: Any, n_blocks: int) -> int:
        """Install a checkpoint's finished blocks; returns the index of the first block still to do."""
        if finished.count > n_blocks or not set(finished.layers) <= set(self.layers):
            raise InputError(str(getattr(finished, "folder", "<checkpoint>")),
                             "checkpoint does not fit this model; rerun without --resume")
        for name, (module, meta) in finished.layers.items():
            replace_module(self.ctx.model, name, module)
            self.layers[name] = module
            self.ctx.record.layers[name] = meta
        if finished.rng_state is not None:
            torch.set_rng_state(finished.rng_state)
        self.ctx.tick("compressing blocks", finished.count, n_blocks)
        return finished.count


@register_pass
class LayerSolvePass(CompressionPass):
    """Prunes and quantizes the selected Linear layers, block after block (see the module docstring)."""

    name = "layer_solve"
    handles = ("prune", "quantize")
    order = ORDER_SOLVE

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        prune = recipe.prune
        if prune is not None and len(prune.layer_sparsity_levels) > 1:
            raise RecipeError("prune.sparsity", prune.sparsity, "one sparsity value (nested elastic levels are not available in this version)")
        if prune is not None and prune.parsed_pattern.is_structured:
            raise RecipeError("prune.pattern", prune.pattern, "unstructured | N:M | bbs | block (structured removal is not available in this version)")
        return [cls()] if prune is not None or recipe.quantize is not None else []

    def run(self, ctx: CompressionContext) -> None:
        solver = BlockSolver(ctx)
        if not solver.layers:
            return
        blocks = solver.layout.blocks
        with torch.no_grad():
            if blocks[0][0] == "":
                inputs = model_inputs(ctx.model, ctx.batches)
            else:
                inputs = capture_block_inputs(ctx.model, blocks[0][1], ctx.batches)
            solver.dense_inputs = list(inputs) if solver.follows_dense else []
            checkpoint = BlockCheckpoint(ctx.open_checkpoint()) if ctx.checkpoint is not None else None
            start = 0
            finished = checkpoint.load_finished() if checkpoint is not None else None
            if finished is not None:
                start = solver.restore(finished, len(blocks))
                if finished.hidden is not None:
                    inputs = [with_hidden(item, hidden) for item, hidden in zip(inputs, finished.hidden)]
                if solver.follows_dense and finished.dense_hidden is not None:
                    solver.dense_inputs = [with_hidden(item, hidden)
                                           for item, hidden in zip(solver.dense_inputs, finished.dense_hidden)]
            for index, (name, block) in enumerate(blocks):
                if index < start:
                    continue
                inputs = solver.compress_block(name, block, inputs)
                if checkpoint is not None:
                    last = index + 1 == len(blocks)
                    dense = None if last or not solver.follows_dense else [hidden_in(i) for i in solver.dense_inputs]
                    checkpoint.save_block(index, *solver.block_layers(index),
                                          None if last else [hidden_in(i) for i in inputs], dense)
                ctx.tick("compressing blocks", index + 1, len(blocks))
