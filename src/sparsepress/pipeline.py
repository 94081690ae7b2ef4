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

import inspect
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .calibration import make_batches, to_token_ids
from .errors import InputError, PoisonedWeightError, RecipeError
from .models import ModelLayout, convert_conv1d_, find_layout, linear_layers, replace_module
from .nn import QuantizedEmbedding
from .packing import choose_packing
from .prune.allocation import LayerSummary, allocate_sparsity
from .prune.solve import compress_weight
from .prune.stats import LayerStats
from .recipe import PruneStage, QuantizeEmbeddingsStage, QuantizeStage, Recipe

Progress = Callable[[str, int, int], None]


@dataclass
class CompressionRecord:
    """What a compression did, kept on the model (`model.sparsepress_record`) for save and inspect."""

    recipe: Recipe
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapter: str = "generic"


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


@dataclass
class _BlockInputs:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


def _targets(stage: PruneStage | QuantizeStage | None, names: list[str], field_name: str) -> set[str]:
    if stage is None:
        return set()
    for pattern in stage.targets:
        if not any(re.fullmatch(pattern, n) for n in names):
            raise RecipeError(f"{stage.kind}.targets", pattern, "a regex fully matching a Linear layer name, e.g. " + (names[0] if names else "<none>"))  # type: ignore[attr-defined]
    return {n for n in names if _matches(n, stage.targets) and not _matches(n, stage.ignore)}


def _check_weights_finite(layers: list[tuple[str, nn.Linear]]) -> None:
    for name, layer in layers:
        if not torch.isfinite(layer.weight).all() or (layer.bias is not None and not torch.isfinite(layer.bias).all()):
            raise PoisonedWeightError(name, "weight")


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    params = inspect.signature(model.forward).parameters
    return {"use_cache": False} if "use_cache" in params else {}


def _capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[_BlockInputs]:
    captured: list[_BlockInputs] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append(_BlockInputs(args, kwargs))
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


def _with_hidden(inputs: _BlockInputs, hidden: torch.Tensor) -> _BlockInputs:
    if inputs.args:
        return _BlockInputs((hidden, *inputs.args[1:]), inputs.kwargs)
    return _BlockInputs((), {**inputs.kwargs, "hidden_states": hidden})


@contextmanager
def _collecting(layers: dict[str, nn.Linear], stats: dict[str, LayerStats]) -> Iterator[None]:
    """Feed each layer's inputs to its stats while the block runs.

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
                stats[_name].add(x.detach())
        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        first_inputs.clear()
        for name, owner in owners.items():
            stats[name] = stats[owner]


class _Compressor:
    """Runs one recipe over one model; holds the per-run state so functions stay explicit."""

    def __init__(self, model: nn.Module, recipe: Recipe, progress: Progress | None):
        self.model, self.recipe, self.progress = model, recipe, progress
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
        _check_weights_finite(list(self.layers.items()))
        self.sparsity: dict[str, float] = {}

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
        for name in targets:
            def hook(_m: nn.Module, args: tuple[Any, ...], _name: str = name) -> None:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                norms[_name] += (x * x).sum(dim=0)
            handles.append(self.layers[name].register_forward_pre_hook(hook))
        try:
            extra = _forward_kwargs(self.model)
            for index, batch in enumerate(batches):
                self.model(**batch, **extra)
                self._tick("allocating", index + 1, len(batches))
        finally:
            for handle in handles:
                handle.remove()
        summaries = [
            LayerSummary(name=name, weight=self.layers[name].weight.detach(), act_norm_sq=norms[name].float(),
                         block=self.layout.block_of(name))
            for name in targets
        ]
        self.sparsity = allocate_sparsity(self.prune.allocation, summaries, mean, self.prune)

    def compress_block(self, block_name: str, block: nn.Module, inputs: list[_BlockInputs]) -> list[_BlockInputs]:
        prefix = f"{block_name}." if block_name else ""
        members = {n: l for n, l in self.layers.items() if n.startswith(prefix) or not block_name}
        stats = {n: LayerStats(l.in_features, name=n) for n, l in members.items()}
        with torch.no_grad():
            if members:
                with _collecting(members, stats):
                    for item in inputs:
                        _run_block(block, item)
            for name, layer in members.items():
                self._compress_layer(name, layer, stats.pop(name))
            if block_name == "":
                return inputs
            return [_with_hidden(item, _run_block(block, item)) for item in inputs]

    def _compress_layer(self, name: str, layer: nn.Linear, stats: LayerStats) -> None:
        prune = self.prune if name in self.prune_targets else None
        quant = self.quant if name in self.quant_targets else None
        sparsity = self.sparsity.get(name) if prune is not None else None
        result = compress_weight(layer.weight.detach().float(), stats, prune=prune, sparsity=sparsity, quant=quant)
        sparse_layer, meta = choose_packing(layer, result, prune, self.recipe.format)
        replace_module(self.model, name, sparse_layer)
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
                raise PoisonedWeightError(name, "embedding table")
            quantized = QuantizedEmbedding.from_embedding(embedding, bits=stage.bits)
            replace_module(self.model, name, quantized)
            self.record.embeddings[name] = {"bits": stage.bits, "shape": list(embedding.weight.shape)}


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
) -> nn.Module:
    """Compress `model` in place with `recipe` and return it (Linear layers become SparseLinear).

    `calibration` is a list of strings (tokenized with `tokenizer`), a list of token-id tensors, or
    None for windows of the bundled WikiText-2 sample. See the module docstring for an example.
    """
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
    runner = _Compressor(model, recipe, progress)
    if runner.layers:
        pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        ids = to_token_ids(calibration, tokenizer, samples, seq_len, recipe.seed)
        batches = make_batches(ids, batch_size, pad_id)
        with torch.no_grad():
            runner.allocate(batches)
            blocks = runner.layout.blocks
            if blocks[0][0] == "":
                inputs = [_BlockInputs((), {**b, **_forward_kwargs(model)}) for b in batches]
            else:
                inputs = _capture_block_inputs(model, blocks[0][1], batches)
            for index, (name, block) in enumerate(blocks):
                inputs = runner.compress_block(name, block, inputs)
                runner._tick("compressing blocks", index + 1, len(blocks))
    embeddings = recipe.stage("quantize_embeddings")
    if embeddings is not None:
        runner.quantize_embeddings(embeddings)  # type: ignore[arg-type]
    model.sparsepress_record = runner.record  # type: ignore[attr-defined]
    return model
