"""One-shot compression, block by block: memory stays near the model plus one block's activations.

Block i's inputs are captured, its Linear layers see calibration statistics and are compressed and
packed, then its outputs are recomputed with the compressed weights and fed to block i+1.

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
import inspect
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .attention import use_native_attention
from .calibration import make_batches, to_token_ids
from .errors import InputError, NonFiniteWarning, PoisonedWeightError, RecipeError
from .fusion import fuse_activations
from .memory import release_file_pages, trim_heap
from .models import ModelLayout, convert_conv1d_, find_layout, linear_layers, replace_module
from .native import release_cached_outputs
from .nn import QuantizedEmbedding
from .packing import choose_packing
from .prune.allocation import LayerSummary, allocate_sparsity
from .prune.solve import compress_weight
from .prune.stats import LayerStats
from .recipe import PruneStage, QuantizeEmbeddingsStage, QuantizeStage, Recipe
from .runtime import use_native_blocks

Progress = Callable[[str, int, int], None]
NONFINITE_POLICIES = ("error", "skip")


@dataclass
class CompressionRecord:
    """What a compression did, kept on the model (`model.sparsepress_record`) for save and inspect."""

    recipe: Recipe
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapter: str = "generic"


# Methods that read the calibration inputs of each layer; the others need no forward pass per block.
CALIBRATED_PRUNE_METHODS = ("wanda", "sparsegpt")
CALIBRATED_QUANT_METHODS = ("gptq",)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class _BlockInputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tokens: torch.Tensor | None = None  # which of the batch's flattened tokens are real (not padding); None: all


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The flattened attention mask of a padded batch (None when every token is real).

    Padding is left out of every calibration statistic: a pad token's activations say nothing about
    the data, and texts of mixed lengths would otherwise weigh the Hessians towards them.
    """
    mask = batch.get("attention_mask")
    if mask is None or bool(mask.all()):
        return None
    return mask.reshape(-1).bool()


def _drop_padding(flat: torch.Tensor, tokens: torch.Tensor | None) -> torch.Tensor:
    """The rows of a layer's flattened inputs that belong to real tokens (all, when the counts differ)."""
    return flat if tokens is None or tokens.numel() != flat.shape[0] else flat[tokens]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _targets(stage: PruneStage | QuantizeStage | None, names: list[str], field_name: str) -> set[str]:
    if stage is None:
        return set()
    for pattern in stage.targets:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise RecipeError(f"{stage.kind}.targets", pattern, "a regex fully matching a Linear layer name, e.g. " + (names[0] if names else "<none>"))  # type: ignore[attr-defined]
    return {n for n in names if _matches(n, stage.targets) and not _matches(n, stage.ignore)}


def _check_weights_finite(layers: list[tuple[str, nn.Linear]], nonfinite: str = "error") -> None:
    for name, layer in layers:
        for what, tensor in (("weight", layer.weight), ("bias", layer.bias)):
            if tensor is None:
                continue
            if bool(torch.isfinite(tensor).all()):
                # The check read every page of a memory-mapped weight; unmodified, those pages can go
                # back to the file until this layer's block is compressed, keeping RSS near one block.
                release_file_pages([tensor])
                continue
            if nonfinite != "skip":
                raise PoisonedWeightError(name, "weight" if what == "weight" else "bias")
            _zero_nonfinite_(name, what, tensor)


def _zero_nonfinite_(name: str, what: str, tensor: torch.Tensor) -> None:
    """nonfinite='skip': NaN / Inf entries become zeros (pruned), with a warning naming the layer."""
    with torch.no_grad():
        bad = ~torch.isfinite(tensor)
        count = int(bad.sum())
        tensor[bad] = 0.0
    warnings.warn(f"{name}: zeroed {count} NaN or Inf entries of its {what}", NonFiniteWarning, stacklevel=3)


def _finite_rows(name: str, xs: Sequence[torch.Tensor], nonfinite: str, dropped: dict[str, int],
                 tokens: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The rows (real tokens) of each x that are finite in every x; NaN / Inf rows raise, or are dropped
    and counted (skip). Paired inputs (compressed and dense) lose a token together."""
    flats = [_drop_padding(x.detach().reshape(-1, x.shape[-1]), tokens) for x in xs]
    finite = torch.stack([torch.isfinite(flat).all(dim=1) for flat in flats]).all(dim=0)
    if bool(finite.all()):
        return flats
    if nonfinite != "skip":
        raise PoisonedWeightError(name, "calibration activations")
    dropped[name] = dropped.get(name, 0) + int((~finite).sum())
    return [flat[finite] for flat in flats]


def _finite_tokens(name: str, x: torch.Tensor, nonfinite: str, dropped: dict[str, int],
                   tokens: torch.Tensor | None = None) -> torch.Tensor:
    """`_finite_rows` of one input."""
    return _finite_rows(name, [x], nonfinite, dropped, tokens)[0]


def _warn_dropped(dropped: dict[str, int]) -> None:
    for name, count in dropped.items():
        warnings.warn(f"{name}: dropped {count} calibration tokens whose inputs hold NaN or Inf",
                      NonFiniteWarning, stacklevel=3)
    dropped.clear()


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[_BlockInputs]:
    captured: list[_BlockInputs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_BlockInputs(args, kwargs, _real_tokens(batches[len(captured)])))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    extra = _forward_kwargs(model)
    try:
        for batch in batches:
            try:
                model(**batch, **extra)
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise InputError("<model>", "the model's forward never reached its first transformer block")
    return captured


def _hidden_of(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    return output[0]  # ModelOutput


def _run_block(block: nn.Module, inputs: _BlockInputs) -> torch.Tensor:
    return _hidden_of(block(*inputs.args, **inputs.kwargs))


def _hidden_in(inputs: _BlockInputs) -> torch.Tensor:
    return inputs.args[0] if inputs.args else inputs.kwargs["hidden_states"]


def _with_hidden(inputs: _BlockInputs, hidden: torch.Tensor) -> _BlockInputs:
    if inputs.args:
        return _BlockInputs((hidden, *inputs.args[1:]), inputs.kwargs, inputs.tokens)
    return _BlockInputs((), {**inputs.kwargs, "hidden_states": hidden}, inputs.tokens)


@contextmanager
def _collecting(layers: dict[str, nn.Linear], stats: dict[str, LayerStats], nonfinite: str = "error",
                dropped: dict[str, int] | None = None,
                tokens: Callable[[], torch.Tensor | None] = lambda: None) -> Iterator[None]:
    """Feed each layer's inputs to its stats while the block runs (`tokens()`: the running batch's real tokens).

    Layers that receive the very same input tensor (q, k, v projections) share one LayerStats, so
    the Hessian is accumulated once; sharing is decided on the first batch by object identity.
    """
    owners: dict[str, str] = {}
    first_inputs: list[tuple[torch.Tensor, str]] = []
    handles = []
    for name, layer in layers.items():
        def hook(_module: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
            x = args[0]
            if _name not in owners:
                owners[_name] = next((owner for seen, owner in first_inputs if seen is x), _name)
                first_inputs.append((x, _name))
            if owners[_name] == _name:
                stats[_name].add(_finite_tokens(_name, x, nonfinite, dropped if dropped is not None else {}, tokens()))
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        first_inputs.clear()
        for name, owner in owners.items():
            stats[name] = stats[owner]


def _read_inputs(block: nn.Module, layers: dict[str, nn.Module], item: _BlockInputs) -> dict[str, torch.Tensor]:
    """Each layer's input tensor during one forward of `block` (shared tensors stay the same object)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name: str, args: tuple[Any, ...]) -> None:  # a hook that returned a value would replace the input
        seen.setdefault(name, args[0])

    handles = [layer.register_forward_pre_hook(lambda _m, args, _n=name: record(_n, args)) for name, layer in layers.items()]
    try:
        _run_block(block, item)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _shared(seen: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Owner -> the other layers fed the very same tensor (their statistics are the owner's)."""
    owners: dict[str, list[str]] = {}
    for name, x in seen.items():
        owner = next((o for o in owners if seen[o] is x), None)
        if owner is None:
            owners[name] = []
        else:
            owners[owner].append(name)
    return owners


class _Compressor:
    """Runs one recipe over one model; holds the per-run state so functions stay explicit."""

    def __init__(self, model: nn.Module, recipe: Recipe, progress: Progress | None, nonfinite: str = "error"):
        self.model, self.recipe, self.progress, self.nonfinite = model, recipe, progress, nonfinite
        self.dropped: dict[str, int] = {}
        self.prune, self.quant = recipe.prune, recipe.quantize
        self.layout: ModelLayout = find_layout(model)
        self.record = CompressionRecord(recipe=recipe, adapter=self.layout.adapter)
        in_blocks = [
            (n, l) for n, l in linear_layers(model) if self.layout.block_of(n) is not None
        ]
        names = [n for n, _ in in_blocks]
        self.prune_targets = _targets(self.prune, names, "prune")
        self.quant_targets = _targets(self.quant, names, "quantize")
        self.layers = {n: l for n, l in in_blocks if n in self.prune_targets | self.quant_targets}
        _check_weights_finite(list(self.layers.items()), nonfinite)
        self.sparsity: dict[str, float] = {}
        # The dense model's inputs to the current block (a dense twin of each block produces the next).
        self.dense_inputs: list[_BlockInputs] = []

    def _tick(self, what: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(what, done, total)

    def allocate(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Per-layer sparsity around the asked mean (uniform, or from a dense statistics pass)."""
        if self.prune is None:
            return
        mean = self.prune.layer_sparsity_levels[0]
        targets = sorted(self.prune_targets)
        if self.prune.allocation == "uniform":
            self.sparsity = {name: mean for name in targets}
            return
        norms = {name: torch.zeros(self.layers[name].in_features, dtype=torch.float64) for name in targets}
        handles = []
        running: list[torch.Tensor | None] = [None]  # the real tokens of the batch being run
        for name in targets:
            def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                x = _finite_tokens(_name, args[0], self.nonfinite, self.dropped, running[0]).double()
                norms[_name] += (x * x).sum(dim=0)
            handles.append(self.layers[name].register_forward_pre_hook(hook))
        try:
            extra = _forward_kwargs(self.model)
            for index, batch in enumerate(batches):
                running[0] = _real_tokens(batch)
                self.model(**batch, **extra)
                self._tick("allocating", index + 1, len(batches))
        finally:
            for handle in handles:
                handle.remove()
        _warn_dropped(self.dropped)
        summaries = [
            LayerSummary(name=name, weight=self.layers[name].weight.detach(), act_norm_sq=norms[name].float(),
                         block=self.layout.block_of(name))
            for name in targets
        ]
        self.sparsity = allocate_sparsity(self.prune.allocation, summaries, mean, self.prune)

    def compress_block(self, block_name: str, block: nn.Module, inputs: list[_BlockInputs]) -> list[_BlockInputs]:
        prefix = f"{block_name}." if block_name else ""
        members = {n: l for n, l in self.layers.items() if n.startswith(prefix) or not block_name}
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
                    if layer_stats is not None and layer_stats.n_tokens == 0 and self.nonfinite == "skip":
                        raise PoisonedWeightError(name, "calibration activations (every calibration token was dropped)")
                    self._compress_layer(name, members[name], layer_stats)
            release_file_pages(dense_weights)
            del dense_weights
            trim_heap()
            if dense_block is not None and block_name:
                self.dense_inputs = [_with_hidden(item, _run_block(dense_block, item)) for item in self.dense_inputs]
            del dense_block
            if block_name == "":
                return inputs
            return [_with_hidden(item, _run_block(block, item)) for item in inputs]

    def _solve_groups(self, block: nn.Module, members: dict[str, nn.Linear],
                      inputs: list[_BlockInputs]) -> list[list[str]]:
        """Layers in the order they run, those fed the very same tensor (q, k, v) in one group.

        Not sequential (or no calibration): one group, every layer seeing the block's dense inputs.
        Layers the block never calls come last (their solve then names them: no calibration tokens).
        """
        if not (self.needs_stats and self.recipe.solver.sequential) or not members:
            return [list(members)] if members else []
        seen = _read_inputs(block, members, inputs[0])  # first calls, in the order they run
        ordered = [[owner, *names] for owner, names in _shared(seen).items()]
        called = {name for names in ordered for name in names}
        unseen = [name for name in members if name not in called]
        return ordered + ([unseen] if unseen else [])

    def _group_stats(self, prefix: str, block: nn.Module, dense_block: nn.Module | None, group: list[str],
                     inputs: list[_BlockInputs]) -> dict[str, LayerStats]:
        """Calibration statistics of `group`'s inputs as the block now runs (earlier groups compressed),
        paired with the dense twin's inputs when the solve aims at the dense model."""
        layers = {name: self.model.get_submodule(name) for name in group}
        stats = {name: LayerStats(layer.in_features, name=name) for name, layer in layers.items()}
        pairs = self.dense_inputs if dense_block is not None else None
        if pairs is None:
            running: list[torch.Tensor | None] = [None]
            with _collecting(layers, stats, self.nonfinite, self.dropped, lambda: running[0]):
                for item in inputs:
                    running[0] = item.tokens
                    _run_block(block, item)
        else:
            for item, dense_item in zip(inputs, pairs):
                seen = _read_inputs(block, layers, item)
                dense_seen = _read_inputs(dense_block, {n: dense_block.get_submodule(n[len(prefix):]) for n in group}, dense_item)
                for owner, names in _shared(seen).items():
                    x, dense_x = _finite_rows(owner, [seen[owner], dense_seen[owner]], self.nonfinite, self.dropped,
                                              item.tokens)
                    stats[owner].add(x, dense_x)
                    for name in names:
                        stats[name] = stats[owner]
        _warn_dropped(self.dropped)
        return stats

    def block_layers(self, index: int) -> tuple[dict[str, nn.Module], dict[str, dict[str, Any]]]:
        """The compressed layers of block `index` and their record entries (for checkpoints)."""
        names = [n for n, meta in self.record.layers.items() if meta.get("block") == index]
        return {n: self.model.get_submodule(n) for n in names}, {n: self.record.layers[n] for n in names}

    def restore(self, finished: Any, n_blocks: int) -> int:
        """Install a checkpoint's finished blocks; returns the index of the first block still to do."""
        if finished.count > n_blocks or not set(finished.layers) <= set(self.layers):
            raise InputError(checkpoint_name(finished), "checkpoint does not fit this model; rerun without --resume")
        for name, (module, meta) in finished.layers.items():
            replace_module(self.model, name, module)
            self.record.layers[name] = meta
        if finished.rng_state is not None:
            torch.set_rng_state(finished.rng_state)
        self._tick("compressing blocks", finished.count, n_blocks)
        return finished.count

    @property
    def follows_dense(self) -> bool:
        """Whether the run carries the dense model's activations (calibrated solves that aim at it)."""
        return self.needs_stats and self.recipe.solver.follows_dense_model

    @property
    def needs_stats(self) -> bool:
        """Whether any asked method reads calibration statistics (magnitude and RTN are data-free)."""
        return (self.prune is not None and self.prune.method in CALIBRATED_PRUNE_METHODS) or (
            self.quant is not None and self.quant.method in CALIBRATED_QUANT_METHODS
        )

    def _compress_layer(self, name: str, layer: nn.Linear, stats: LayerStats | None) -> None:
        prune = self.prune if name in self.prune_targets else None
        quant = self.quant if name in self.quant_targets else None
        sparsity = self.sparsity.get(name) if prune is not None else None
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
        replace_module(self.model, name, sparse_layer)
        # Let the dense weight go now: keeping every dense Linear here until the run ends would hold
        # dense and packed copies of the whole model at once.
        self.layers[name] = sparse_layer  # type: ignore[assignment]
        meta.update(
            method=prune.method if prune else None,
            pattern=prune.pattern if prune else None,
            target_sparsity=sparsity,
            quant_method=quant.method if quant else None,
            block=self.layout.block_of(name),
        )
        self.record.layers[name] = meta

    def quantize_embeddings(self, stage: QuantizeEmbeddingsStage) -> None:
        tied = {id(p) for m in self.model.modules() if isinstance(m, nn.Linear) for p in [m.weight]}
        for name, embedding in list(self.model.named_modules()):
            if not isinstance(embedding, nn.Embedding):
                continue
            if id(embedding.weight) in tied:
                # Tied to an output head: quantizing one copy would silently untie them.
                self.record.embeddings[name] = {"bits": None, "skipped": "tied to an output Linear"}
                continue
            if type(embedding).forward is not nn.Embedding.forward:
                # Subclasses with their own forward (OPT's learned positions take an offset and
                # position_ids) would lose that behaviour inside a plain lookup table.
                self.record.embeddings[name] = {"bits": None, "skipped": f"custom forward ({type(embedding).__name__})"}
                continue
            if not torch.isfinite(embedding.weight).all():
                if self.nonfinite != "skip":
                    raise PoisonedWeightError(name, "embedding table")
                _zero_nonfinite_(name, "embedding table", embedding.weight)
            quantized = QuantizedEmbedding.from_embedding(embedding, bits=stage.bits)
            replace_module(self.model, name, quantized)
            self.record.embeddings[name] = {"bits": stage.bits, "shape": list(embedding.weight.shape)}


def checkpoint_name(finished: Any) -> str:
    return str(getattr(finished, "folder", "<checkpoint>"))


UNSUPPORTED_STAGES = {
    "activation_sparsity": "runtime activation sparsity",
    "distill": "distillation recovery",
}


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
) -> nn.Module:
    """Compress `model` in place with `recipe` and return it (Linear layers become SparseLinear).

    `calibration` is a list of strings (tokenized with `tokenizer`), a list of token-id tensors, or
    None for windows of the bundled WikiText-2 sample. See the module docstring for an example.
    `nonfinite="skip"` zeroes NaN / Inf weights and drops NaN / Inf calibration tokens with a
    NonFiniteWarning naming the layer (default "error": PoisonedWeightError). `checkpoint` (a
    `sparsepress.checkpoint.Checkpoint`) saves each finished block and, when resuming, restores them.
    """
    if nonfinite not in NONFINITE_POLICIES:
        raise InputError("nonfinite", f"got {nonfinite!r}; allowed: {' | '.join(NONFINITE_POLICIES)}")
    if not isinstance(recipe, Recipe):
        recipe = Recipe.model_validate(recipe)
    for stage in recipe.stages:
        kind = stage.kind  # type: ignore[attr-defined]
        if kind in UNSUPPORTED_STAGES:
            raise RecipeError(f"stages.{kind}", kind, f"prune | quantize | quantize_embeddings ({UNSUPPORTED_STAGES[kind]} is not available in this version)")
    prune = recipe.prune
    if prune is not None and len(prune.layer_sparsity_levels) > 1:
        raise RecipeError("prune.sparsity", prune.sparsity, "one sparsity value (nested elastic levels are not available in this version)")
    if prune is not None and prune.parsed_pattern.is_structured:
        raise RecipeError("prune.pattern", prune.pattern, "unstructured | N:M | bbs | block (structured removal is not available in this version)")
    if recipe.budget is not None:
        raise RecipeError("budget", recipe.budget.model_dump(exclude_none=True), "no budget (budget allocation is not available in this version)")
    torch.manual_seed(recipe.seed)
    model.eval()
    convert_conv1d_(model)
    runner = _Compressor(model, recipe, progress, nonfinite)
    if runner.layers:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        ids = to_token_ids(calibration, tokenizer, samples, seq_len, recipe.seed)
        batches = make_batches(ids, batch_size, pad_id)
        with torch.no_grad():
            runner.allocate(batches)
            blocks = runner.layout.blocks
            if blocks[0][0] == "":
                inputs = [_BlockInputs((), {**b, **_forward_kwargs(model)}, _real_tokens(b)) for b in batches]
            else:
                inputs = _capture_block_inputs(model, blocks[0][1], batches)
            runner.dense_inputs = list(inputs) if runner.follows_dense else []
            start = 0
            if checkpoint is not None:
                checkpoint.begin(recipe, ids, {"samples": samples, "seq_len": seq_len, "batch_size": batch_size,
                                               "nonfinite": nonfinite})
                finished = checkpoint.load_finished()
                if finished is not None:
                    start = runner.restore(finished, len(blocks))
                    if finished.hidden is not None:
                        inputs = [_with_hidden(item, hidden) for item, hidden in zip(inputs, finished.hidden)]
                    if runner.follows_dense and finished.dense_hidden is not None:
                        runner.dense_inputs = [_with_hidden(item, hidden)
                                               for item, hidden in zip(runner.dense_inputs, finished.dense_hidden)]
            for index, (name, block) in enumerate(blocks):
                if index < start:
                    continue
                inputs = runner.compress_block(name, block, inputs)
                if checkpoint is not None:
                    last = index + 1 == len(blocks)
                    dense = None if last or not runner.follows_dense else [_hidden_in(i) for i in runner.dense_inputs]
                    checkpoint.save_block(index, *runner.block_layers(index),
                                          None if last else [_hidden_in(i) for i in inputs], dense)
                runner._tick("compressing blocks", index + 1, len(blocks))
    embeddings = recipe.stage("quantize_embeddings")
    if embeddings is not None:
        runner.quantize_embeddings(embeddings)  # type: ignore[arg-type]
    model.sparsepress_record = runner.record  # type: ignore[attr-defined]
    fuse_activations(model)
    use_native_attention(model)
    use_native_blocks(model)
    return model
