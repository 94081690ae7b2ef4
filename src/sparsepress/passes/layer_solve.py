"""Pass: the block-sequential layer solve (prune and quantize stages) — memory bounded by one block.

Block i's inputs are captured, its Linear layers see calibration statistics (in the order they run,
each on the inputs the already compressed layers produce, paired with a dense twin's when the solve
aims at the dense model) and are compressed and packed; then its outputs are recomputed with the
compressed weights and fed to block i+1. Finished blocks are checkpointed when the run has one.

A recipe with a `distill` stage splits the solve in two instances (`SolveMode`): a prune solve
(order ORDER_SOLVE) that prunes but neither quantizes nor packs (the layers stay trainable nn.Linear,
their keep-masks in `ctx.masks`), and, after distillation, a finishing solve (order ORDER_QUANTIZE)
that quantizes with those masks fixed (GPTQ compensating on the kept weights, on calibration data
run through the distilled model) and packs.

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
from ..formats import DenseWeight, ElasticWeight
from ..nn import SparseLinear
from ..nn.elastic import ElasticLinear, install_levels
from ..packing import DTYPE_OF_BITS, choose_packing
from ..prune.nested import compress_nested
from ..prune.solve import compress_weight
from ..prune.stats import LayerStats
from ..recipe import PruneStage, QuantizeStage, Recipe
from .base import ORDER_RECOVERY, ORDER_SOLVE, CompressionPass, register_pass
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
    run_block_until_stopped,
    shared_inputs,
    stopping_once_seen,
    warn_dropped,
    with_hidden,
)
from .context import CompressionContext, LayerTarget

# Methods that read the calibration inputs of each layer; the others need no forward pass per block.
CALIBRATED_PRUNE_METHODS = ("wanda", "sparsegpt")
CALIBRATED_QUANT_METHODS = ("gptq",)


# The finishing solve after distillation: between recovery and the passes calibrated on final weights.
ORDER_QUANTIZE = ORDER_RECOVERY + 10


def cubic_level(round_: int, rounds: int) -> float:
    """Share of the target sparsity pruned by gradual round `round_` of `rounds`: 1 - (1 - r/R)^3
    (Zhu & Gupta's cubic schedule: large steps first, small ones near the target).

    Example:
        >>> [round(cubic_level(r, 3), 3) for r in (1, 2, 3)]
        [0.704, 0.963, 1.0]
    """
    return 1.0 - (1.0 - round_ / rounds) ** 3


def gradual_order(round_: int, rounds: int, what: str) -> float:
    """Order of round `round_`'s prune solve or distillation: rounds alternate from ORDER_SOLVE, the
    last distillation at ORDER_RECOVERY.

    Example:
        >>> [round(gradual_order(r, 2, w), 2) for r in (1, 2) for w in ("prune", "distill")]
        [50.0, 53.33, 56.67, 60.0]
        >>> gradual_order(1, 1, "prune"), gradual_order(1, 1, "distill")
        (50.0, 60.0)
    """
    if rounds == 1:
        return float(ORDER_SOLVE if what == "prune" else ORDER_RECOVERY)
    step = (ORDER_RECOVERY - ORDER_SOLVE) / (rounds - 0.5)
    return ORDER_SOLVE + (round_ - 1) * step + (0.5 * step if what == "distill" else 0.0)



# The base formats nested levels are stored in: what the recipe names, else by pattern.
ELASTIC_BASES = ("bitmask", "bbs", "csr", "dense")


def elastic_base(requested: str, prune: PruneStage) -> str:
    """The format the lowest elastic level is stored in: `requested` when it is a base format, else the
    pattern's natural one (bbs for bbs, bitmask otherwise).

    Example:
        >>> elastic_base("auto", PruneStage(method="wanda", sparsity=[0.5, 0.7], pattern="bbs"))
        'bbs'
    """
    if requested in ELASTIC_BASES:
        return requested
    return "bbs" if prune.parsed_pattern.kind == "bbs" else "bitmask"


def needs_statistics(prune: PruneStage | None, quant: QuantizeStage | None) -> bool:
    """Whether any asked method reads calibration statistics (magnitude and RTN are data-free).

    Example:
        >>> needs_statistics(None, QuantizeStage(method="rtn"))
        False
    """
    return (prune is not None and prune.method in CALIBRATED_PRUNE_METHODS) or (
        quant is not None and quant.method in CALIBRATED_QUANT_METHODS)


# What one instance of the solve does: everything at once ("full"), prune only and leave the layers
# trainable ("prune", before distillation), or quantize / pack with the masks fixed ("finish", after it).
SOLVE_MODES = ("full", "prune", "finish")
PROGRESS_LABELS = {"full": "compressing blocks", "prune": "pruning blocks", "finish": "finishing blocks"}


class BlockSolver:
    """Solves one block's layers at a time; holds the per-run state so functions stay explicit."""

    def __init__(self, ctx: CompressionContext, mode: str = "full", level: float = 1.0):
        self.ctx = ctx
        self.recipe = ctx.recipe
        self.mode = mode
        self.level = level  # share of each layer's target sparsity this solve prunes to (gradual rounds)
        self.prune = ctx.recipe.prune if mode != "finish" else None
        self.quant = ctx.recipe.quantize if mode != "prune" else None
        selection = ctx.selection
        self.prune_targets, self.quant_targets = selection.prune_targets, selection.quant_targets
        wanted = self.prune_targets if mode == "prune" else selection.layers
        self.layers: dict[str, nn.Module] = {n: m for n, m in selection.layers.items() if n in wanted}
        self.layout = ctx.layout
        self.needs_stats = needs_statistics(self.prune, self.quant)
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
                targets = self._settle(group, members, stats)
                for name in group:
                    self._compress_layer(name, members[name], stats.get(name), targets.pop(name))
                del stats, targets
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
        stop = self.calibration.stops_early  # the forward goes no further than the group's last layer
        with self.calibration.pass_over(block, dense_block) as begin_batch:
            if dense_block is None:
                running: list[torch.Tensor | None] = [None]
                with collecting(layers, stats, ctx.nonfinite, ctx.dropped, lambda: running[0]), \
                        stopping_once_seen(layers if stop else {}) as arm:
                    for item in inputs:
                        running[0] = item.tokens
                        begin_batch(item.tokens)
                        arm()
                        run_block_until_stopped(block, item)
            else:
                dense_layers = {n: dense_block.get_submodule(n[len(prefix):]) for n in group}
                for item, dense_item in zip(inputs, self.dense_inputs):
                    begin_batch(item.tokens)
                    seen = layer_inputs(block, layers, item, stop=stop)
                    dense_seen = layer_inputs(dense_block, dense_layers, dense_item, stop=stop)
                    for owner, names in shared_inputs(seen).items():
                        x, dense_x = finite_rows(owner, [seen[owner], dense_seen[owner]], ctx.nonfinite, ctx.dropped,
                                                 item.tokens)
                        stats[owner].add(x, dense_x)
                        for name in names:
                            stats[name] = stats[owner]
        warn_dropped(ctx.dropped)
        return self.calibration.finish(block, stats, inputs)

    def _settle(self, group: list[str], members: dict[str, nn.Module],
                stats: dict[str, LayerStats]) -> dict[str, torch.Tensor]:
        """Each layer's float32 weight to solve for (moved toward its dense target when the solve aims at
        the dense model), then every statistics object of the group settled (`LayerStats.settle`): the
        layers sharing one (q, k, v) share one factorisation, and the solve holds one Hessian per input."""
        weights = {name: members[name].weight.detach().float() for name in group}
        aims: dict[int, tuple[LayerStats, dict[float, list[str]]]] = {}
        for name in group:
            layer_stats = stats.get(name)
            if layer_stats is None:
                continue
            _, by_dampening = aims.setdefault(id(layer_stats), (layer_stats, {}))
            prune, quant = self._stages_for(name, self.ctx.targets.get(name, LayerTarget()))
            if layer_stats.tracks_dense and (prune or quant) is not None:
                by_dampening.setdefault((prune or quant).dampening, []).append(name)  # type: ignore[union-attr]
        strength = self.recipe.solver.dense_target
        for layer_stats, by_dampening in aims.values():
            *others, last = list(by_dampening.items()) or [(0.01, [])]
            for dampening, names in others:  # layers of one input with other dampenings: rare, unsettled
                for name in names:
                    weights[name] = layer_stats.dense_target(weights[name], strength, dampening)
            dampening, names = last
            for name, target in zip(names, layer_stats.settle([weights[n] for n in names], strength, dampening)):
                weights[name] = target
        return weights

    def _stages_for(self, name: str, target: LayerTarget) -> tuple[PruneStage | None, QuantizeStage | None]:
        """The prune and quantize stages of layer `name`: the recipe's, with the target's overrides."""
        prune = self.prune if name in self.prune_targets else None
        quant = self.quant if name in self.quant_targets else None
        if prune is not None and target.pattern is not None:
            prune = prune.model_copy(update={"pattern": target.pattern})
        if prune is not None and target.sparsity == 0.0 and not target.elastic and prune.parsed_pattern.kind != "nm":
            prune = None  # kept dense
        if target.bits is not None:
            method = quant.method if quant is not None else ("gptq" if self.needs_stats else "rtn")
            quant = (quant or QuantizeStage(method=method)).model_copy(
                update={"bits": target.bits, "group_size": target.group_size})
        return prune, quant

    def _compress_layer(self, name: str, layer: nn.Linear, stats: LayerStats | None, weight: torch.Tensor) -> None:
        target = self.ctx.targets.get(name, LayerTarget())
        prune, quant = self._stages_for(name, target)
        mask = self.ctx.masks.get(name) if self.mode == "finish" else None
        sparsity = target.sparsity if prune is not None else None
        if sparsity is not None and self.level != 1.0:
            sparsity *= self.level
        refit = self.recipe.solver.refit and stats is not None
        correct = stats is not None and stats.tracks_dense and self.recipe.solver.bias_correction and layer.bias is not None
        if prune is not None and target.elastic:  # never in the prune / finish modes (LayerSolvePass.plan)
            sparse_layer, meta = self._nested_layer(name, layer, weight, stats, prune, quant, target, refit, correct)
            meta.update(method=prune.method, pattern=prune.pattern)
        else:
            result = compress_weight(weight, stats, prune=prune, sparsity=sparsity, quant=quant, refit=refit,
                                     mask_search=self.recipe.solver.mask_search, name=name, mask=mask)
            if self.mode == "prune":
                self._keep_trainable(name, layer, result.weight, result.mask, stats, prune, sparsity)
                return
            packing_stage = prune if prune is not None else (self.recipe.prune if mask is not None else None)
            sparse_layer, meta = choose_packing(layer, result, packing_stage, target.format or self.recipe.format)
            if correct and sparse_layer.bias is not None:
                # A new tensor: the packed layer's bias may share the (possibly memory-mapped) dense one's storage.
                sparse_layer.bias = sparse_layer.bias + stats.bias_gap(layer.weight.detach(), result.weight)  # type: ignore[union-attr]
                meta["bias_corrected"] = True
            if mask is not None:  # the prune solve before distillation recorded how the mask came to be
                meta.update({k: v for k, v in self.ctx.record.layers.get(name, {}).items()
                             if k in ("method", "pattern", "target_sparsity", "bias_corrected")})
            else:
                meta.update(method=prune.method if prune else None, pattern=prune.pattern if prune else None,
                            target_sparsity=sparsity)
        replace_module(self.ctx.model, name, sparse_layer)
        # Let the dense weight go now: keeping every dense Linear here until the run ends would hold
        # dense and packed copies of the whole model at once.
        self.layers[name] = sparse_layer
        meta.update(quant_method=quant.method if quant else None, block=self.layout.block_of(name))
        self.ctx.record.layers[name] = meta

    def _keep_trainable(self, name: str, layer: nn.Linear, weight: torch.Tensor, keep: torch.Tensor | None,
                        stats: LayerStats | None, prune: PruneStage | None, sparsity: float | None) -> None:
        """Prune solve: the layer stays an nn.Linear holding the pruned weight; its mask goes to `ctx.masks`."""
        meta: dict[str, Any] = {"method": prune.method if prune else None, "pattern": prune.pattern if prune else None,
                                "target_sparsity": sparsity, "block": self.layout.block_of(name)}
        dense_weight = layer.weight.detach().clone() if stats is not None and stats.tracks_dense else None
        layer.weight = nn.Parameter(weight.to(layer.weight.dtype).contiguous())
        if dense_weight is not None and self.recipe.solver.bias_correction and layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach() + stats.bias_gap(dense_weight, weight))  # type: ignore[union-attr]
            meta["bias_corrected"] = True
        if keep is not None:
            self.ctx.masks[name] = keep.bool()
        self.ctx.record.layers[name] = meta

    def _nested_layer(self, name: str, layer: nn.Linear, weight: torch.Tensor, stats: LayerStats | None,
                      prune: PruneStage, quant: QuantizeStage | None, target: LayerTarget, refit: bool,
                      correct: bool) -> tuple[ElasticLinear, dict[str, Any]]:
        """Nested elastic levels of one layer (prune/nested.py), packed as an ElasticLinear."""
        nested = compress_nested(weight, stats, prune, target.levels, quant, name=name, refit=refit,
                                 mask_search=self.recipe.solver.mask_search)
        base = elastic_base(target.format or self.recipe.format, prune)
        bias, shifts = layer.bias, None
        if correct:
            dense = layer.weight.detach()
            gaps = torch.stack([stats.bias_gap(dense, nested.level_weight(i))  # type: ignore[union-attr]
                                for i in range(len(nested.keeps))])
            bias, shifts = layer.bias.detach().float() + gaps[0], gaps - gaps[0]  # type: ignore[union-attr]
        params = {"bank": prune.bank} if base == "bbs" else {}
        packed = ElasticWeight.pack(nested.weight, dtype=DTYPE_OF_BITS[nested.bits], scales=nested.scales,
                                    group_size=nested.group_size, keeps=list(nested.keeps), levels=target.levels,
                                    base=base, gains=nested.gains, shifts=shifts, **params)
        module = ElasticLinear(packed, bias)
        meta = {"format": "elastic", "base": base, "dtype": packed.dtype, "levels": list(target.levels),
                "sparsity": packed.sparsity, "level_sparsity": [packed.level_sparsity(i) for i in range(packed.n_levels)],
                "nbytes": module.nbytes, "bias_corrected": correct}
        return module, meta

    def block_layers(self, index: int) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
        """The compressed layers of block `index` and their record entries (for checkpoints); the prune
        solve's trainable layers travel as fp32 dense packs."""
        record = self.ctx.record.layers
        names = [n for n, meta in record.items() if meta.get("block") == index and n in self.layers]
        modules = {n: self.ctx.model.get_submodule(n) for n in names}
        if self.mode == "prune":
            modules = {n: SparseLinear(DenseWeight.pack(m.weight.detach()), None if m.bias is None else m.bias.detach())
                       for n, m in modules.items()}
        return modules, {n: record[n] for n in names}

    def spill_block(self, index: int) -> None:
        """Write block `index`'s packed layers to the run's spill folder; the model (and this solver) keep
        only their placeholders, so the packed tensors leave memory."""
        names = [n for n, meta in self.ctx.record.layers.items() if meta.get("block") == index and n in self.layers]
        self.ctx.spill.spill_(self.ctx.model, index, names)
        self.layers.update({name: self.ctx.model.get_submodule(name) for name in names})

    def _restore_trainable(self, name: str, module: SparseLinear) -> None:
        layer = self.layers[name]
        weight = module.packed.unpack().to(layer.weight.dtype)
        layer.weight = nn.Parameter(weight)
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().clone())
        if self.prune is not None and name in self.prune_targets:
            self.ctx.masks[name] = weight != 0

    def restore(self, finished: Any, n_blocks: int) -> int:
        """Install a checkpoint's finished blocks; returns the index of the first block still to do."""
        if finished.count > n_blocks or not set(finished.layers) <= set(self.layers):
            raise InputError(str(getattr(finished, "folder", "<checkpoint>")),
                             "checkpoint does not fit this model; rerun without --resume")
        for name, (module, meta) in finished.layers.items():
            if self.mode == "prune":  # back to a trainable layer; its mask is where the weight is not zero
                self._restore_trainable(name, module)
            else:
                replace_module(self.ctx.model, name, module)
                self.layers[name] = module
            self.ctx.record.layers[name] = meta
        if finished.rng_state is not None:
            torch.set_rng_state(finished.rng_state)
        self.ctx.tick(PROGRESS_LABELS[self.mode], finished.count, n_blocks)
        return finished.count


@register_pass
class LayerSolvePass(CompressionPass):
    """Prunes and quantizes the selected Linear layers, block after block (see the module docstring)."""

    name = "layer_solve"
    handles = ("prune", "quantize")
    order = ORDER_SOLVE

    def __init__(self, mode: str = "full", round_: int = 1, rounds: int = 1):
        if mode not in SOLVE_MODES:
            raise ValueError(f"solve mode {mode!r}: {' | '.join(SOLVE_MODES)}")
        self.mode = mode
        self.round, self.rounds = round_, rounds
        self.order = ORDER_QUANTIZE if mode == "finish" else gradual_order(round_, rounds, "prune")

    @classmethod
    def plan(cls, recipe: Recipe) -> list[CompressionPass]:
        prune = recipe.prune
        if prune is not None and len(prune.layer_sparsity_levels) > 1 and recipe.distill is not None:
            raise RecipeError("prune.sparsity", prune.sparsity, "one sparsity value with a distill stage (nested elastic levels are compressed without distillation)")
        distill = recipe.distill
        if distill is None:
            return [cls()] if prune is not None or recipe.quantize is not None else []
        rounds = distill.rounds
        if rounds > 1 and (prune is None or prune.parsed_pattern.kind == "nm"):
            raise RecipeError("distill.rounds", rounds, "1 (gradual rounds need a prune stage with pattern unstructured | bbs | block)")
        # Distillation trains between pruning and quantization: prune first (layers stay trainable),
        # then quantize and pack with the masks fixed on calibration data through the distilled model.
        planned = [cls("prune", r, rounds) for r in range(1, rounds + 1)] if prune is not None else []
        return planned + ([cls("finish")] if prune is not None or recipe.quantize is not None else [])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, round={self.round}/{self.rounds}, order={self.order})"

    def run(self, ctx: CompressionContext) -> None:
        solver = BlockSolver(ctx, self.mode, cubic_level(self.round, self.rounds))
        if not solver.layers:
            return
        blocks = solver.layout.blocks
        with torch.no_grad():
            if blocks[0][0] == "":
                inputs = model_inputs(ctx.model, ctx.batches)
            else:
                inputs = capture_block_inputs(ctx.model, blocks[0][1], ctx.batches)
            solver.dense_inputs = list(inputs) if solver.follows_dense else []
            prefix = {"prune": "prune-", "finish": "finish-"}.get(self.mode, "")
            prefix = f"round{self.round}-{prefix}" if self.round > 1 else prefix
            checkpoint = BlockCheckpoint(ctx.open_checkpoint(), prefix) if ctx.checkpoint is not None else None
            start = 0
            spills = ctx.spill is not None and self.mode == "full"
            finished = checkpoint.load_finished() if checkpoint is not None else None
            if finished is not None:
                start = solver.restore(finished, len(blocks))
                finished.layers.clear()  # installed now; this dict would keep spilled layers alive
                for index in range(start if spills else 0):
                    solver.spill_block(index)
                if finished.hidden is not None:
                    inputs = [with_hidden(item, hidden) for item, hidden in zip(inputs, finished.hidden)]
                if solver.follows_dense and finished.dense_hidden is not None:
                    solver.dense_inputs = [with_hidden(item, hidden)
                                           for item, hidden in zip(solver.dense_inputs, finished.dense_hidden)]
            for index, (name, block) in enumerate(blocks):
                with ctx.block_weights(name):  # a streamed model reads the block from disk here
                    if index < start:
                        continue
                    inputs = solver.compress_block(name, block, inputs)
                if checkpoint is not None:
                    last = index + 1 == len(blocks)
                    dense = None if last or not solver.follows_dense else [hidden_in(i) for i in solver.dense_inputs]
                    checkpoint.save_block(index, *solver.block_layers(index),
                                          None if last else [hidden_in(i) for i in inputs], dense)
                if spills and index >= start:
                    solver.spill_block(index)
                ctx.tick(PROGRESS_LABELS[self.mode], index + 1, len(blocks))
            if ctx.weights is not None:
                ctx.weights.load_rest_(ctx.model)  # the final norm and head, for the passes after this one
        levels = elastic_levels(ctx)
        if levels:
            install_levels(ctx.model, levels, active=levels[0])
            ctx.record.extra["elastic"] = {"levels": levels, "default": levels[0]}


def elastic_levels(ctx: CompressionContext) -> list[float]:
    """The model-level elastic sparsities of a run (the prune stage's list), or [] for one level."""
    prune = ctx.recipe.prune
    if prune is None or not any(target.elastic for target in ctx.targets.values()):
        return []
    return list(prune.layer_sparsity_levels)
