"""Per-layer sensitivity: the fidelity each Linear (and embedding table) costs under each compression option.

For every targeted Linear and every option (sparsity x pattern x bits) the layer alone is compressed
with the recipe's method (its mask, the least-squares refit; no mask search) and quantizer, the rest
of the model kept dense, and the loss is `1 - mean cosine` of the model's mean-pooled outputs to the
dense model's on calibration samples. Embedding tables are measured per bit width the same way.
The budget allocator (`sparsepress.budget`) adds these losses up to predict a whole configuration.

The curves are cached on disk (JSON under `cache_dir()`, by a key over the weights, the calibration
tokens, the options and the method), so a rerun with the same model and calibration is fast.

Example:
    >>> LayerOption(0.5, "unstructured", 8).label, LayerOption(0.0, "unstructured", 4).format
    ('unstructured 0.5 int8', 'dense')
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .calibration import make_batches
from .evaluate import pooled_output
from .nn import QuantizedEmbedding
from .prune.masks import MaskSpec
from .prune.solve import FixedMaskPlan, QUANT_FINISHERS, compress_weight
from .prune.stats import LayerStats
from .recipe import Pattern, PruneStage, QuantizeStage

CACHE_ENV = "SPARSEPRESS_CACHE_DIR"
_PATTERN_FORMATS = {"unstructured": "bitmask", "nm": "nm", "bbs": "bbs"}


def cache_dir() -> Path:
    """Where sparsepress caches measurements: $SPARSEPRESS_CACHE_DIR, else $XDG_CACHE_HOME/sparsepress,
    else ~/.cache/sparsepress.

    Example:
        >>> cache_dir().name in ("sparsepress", os.environ.get(CACHE_ENV, "sparsepress").rstrip("/").split("/")[-1])
        True
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sparsepress"


@dataclass(frozen=True, order=True)
class LayerOption:
    """One way to compress a Linear: sparsity, pattern ("unstructured", "bbs" or "N:M") and value bits."""

    sparsity: float
    pattern: str = "unstructured"
    bits: int = 8

    @property
    def label(self) -> str:
        kind = "dense" if self.sparsity == 0.0 else f"{self.pattern} {self.sparsity:g}"
        return f"{kind} int{self.bits}"

    @property
    def format(self) -> str:
        """The packed format this option is stored in."""
        if self.sparsity == 0.0:
            return "dense"
        return _PATTERN_FORMATS[Pattern.parse(self.pattern).kind]


def layer_options(sparsities: Sequence[float], patterns: Sequence[str], bits: Sequence[int]) -> list[LayerOption]:
    """Every option a budget allows, once each (an N:M pattern implies its sparsity; 0 is dense).

    Example:
        >>> [o.label for o in layer_options([0.0, 0.5], ["unstructured", "2:4"], [8])]
        ['dense int8', 'unstructured 0.5 int8', '2:4 0.5 int8']
    """
    options: list[LayerOption] = []
    for pattern in patterns:
        parsed = Pattern.parse(pattern)
        levels = [1.0 - parsed.n / parsed.m] if parsed.kind == "nm" else list(sparsities)  # type: ignore[operator]
        for sparsity in levels:
            for width in bits:
                option = LayerOption(0.0, "unstructured", width) if sparsity == 0.0 else LayerOption(sparsity, pattern, width)
                if option not in options:
                    options.append(option)
    return options


@dataclass
class Curves:
    """Measured losses: `layers[name][option label]`, `embeddings[name][bits]` (bits as text, "32" = fp32)."""

    layers: dict[str, dict[str, float]]
    embeddings: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"layers": self.layers, "embeddings": self.embeddings}


@dataclass(frozen=True)
class SensitivitySetup:
    """How each option is compressed: the prune method, the quantizer, group sizes per bit width, refit."""

    method: str
    quant_method: str
    group_sizes: dict[int, int | None]
    refit: bool
    dampening: float = 0.01
    blocksize: int = 128

    def key(self) -> str:
        return json.dumps([self.method, self.quant_method, sorted(self.group_sizes.items()), self.refit,
                           self.dampening, self.blocksize])


def fingerprint(tensors: Sequence[torch.Tensor]) -> str:
    """blake2b of the tensors' bytes (and shapes): the cache key's view of the weights or tokens.

    Example:
        >>> fingerprint([torch.ones(2)]) == fingerprint([torch.ones(2)]) != fingerprint([torch.zeros(2)])
        True
    """
    digest = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        data = tensor.detach().contiguous().cpu()
        digest.update(str((tuple(data.shape), str(data.dtype))).encode())
        digest.update(data.view(torch.uint8).numpy() if data.dtype != torch.uint8 else data.numpy())
    return digest.hexdigest()


def _cache_path(key: str) -> Path:
    return cache_dir() / "sensitivity" / f"{key}.json"


def load_cached(key: str) -> Curves | None:
    """The cached curves under `key`, or None (missing or unreadable: measured again)."""
    path = _cache_path(key)
    try:
        body = json.loads(path.read_text())
        return Curves(layers=body["layers"], embeddings=body["embeddings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store_cached(key: str, curves: Curves) -> None:
    """Write the curves under `key` atomically (a failure to write only costs the next run the time)."""
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            json.dump({"version": __version__, **curves.to_json()}, handle)
        os.replace(handle.name, path)
    except OSError:
        pass


@contextmanager
def swapped(model: nn.Module, name: str, module: nn.Module) -> Iterator[None]:
    """`model.name` replaced by `module` inside the block, restored after."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    original = getattr(parent, child)
    setattr(parent, child, module)
    try:
        yield
    finally:
        setattr(parent, child, original)


def _linear_with(layer: nn.Linear, weight: torch.Tensor) -> nn.Linear:
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        out.weight.copy_(weight)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
    return out.eval()


class Probe:
    """Fidelity loss of the model with one module swapped, on fixed samples (dense outputs computed once)."""

    def __init__(self, model: nn.Module, samples: list[torch.Tensor], pad_id: int = 0, batch_size: int = 16):
        self.model = model
        self.batches = make_batches(samples, batch_size, pad_id)
        self.reference = [pooled_output(model, batch) for batch in self.batches]

    def loss(self, name: str, module: nn.Module) -> float:
        total, count = 0.0, 0
        with swapped(self.model, name, module), torch.no_grad():
            for batch, ref in zip(self.batches, self.reference):
                pooled = pooled_output(self.model, batch)
                cos = torch.nn.functional.cosine_similarity(pooled.float(), ref.float(), dim=-1)
                total += float(cos.sum())
                count += cos.numel()
        return max(0.0, 1.0 - total / max(count, 1))


def layer_statistics(model: nn.Module, layers: dict[str, nn.Linear], batches: list[dict[str, torch.Tensor]],
                     extra: dict[str, Any] | None = None) -> dict[str, LayerStats]:
    """LayerStats of each layer's inputs over the calibration batches (one dense forward, padding left out)."""
    from .passes.blocks import real_tokens

    stats = {name: LayerStats(layer.in_features, name=name) for name, layer in layers.items()}
    running: list[torch.Tensor | None] = [None]

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            mask = running[0]
            stats[name].add(x[mask.reshape(-1)] if mask is not None and mask.numel() == x.shape[0] else x)
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                running[0] = real_tokens(batch)
                model(**batch, **(extra or {}))
    finally:
        for handle in handles:
            handle.remove()
    return stats


def compressed_weights(weight: torch.Tensor, stats: LayerStats, options: Sequence[LayerOption],
                       setup: SensitivitySetup) -> Iterator[tuple[LayerOption, torch.Tensor]]:
    """(option, dequantized weight) for every option: each sparsity pruned (and refitted) once, then
    quantized at each bit width with its mask fixed."""
    by_shape: dict[tuple[float, str], list[LayerOption]] = {}
    for option in options:
        by_shape.setdefault((option.sparsity, option.pattern), []).append(option)
    for (sparsity, pattern), group in by_shape.items():
        plan = None
        pruned = weight
        if sparsity > 0:
            prune = PruneStage(method=setup.method, pattern=pattern,
                               sparsity=None if Pattern.parse(pattern).kind == "nm" else sparsity,
                               dampening=setup.dampening, blocksize=setup.blocksize)
            result = compress_weight(weight, stats, prune=prune, sparsity=MaskSpec.from_stage(prune, sparsity).sparsity,
                                     refit=setup.refit)
            pruned = result.weight
            plan = FixedMaskPlan(result.mask)  # type: ignore[arg-type]
        for option in group:
            quant = QuantizeStage(method=setup.quant_method, bits=option.bits,  # type: ignore[arg-type]
                                  group_size=setup.group_sizes.get(option.bits), dampening=setup.dampening)
            yield option, QUANT_FINISHERS[quant.method](pruned, stats, plan, quant).weight


def measure_sensitivity(model: nn.Module, layers: dict[str, nn.Linear], embeddings: dict[str, nn.Embedding],
                        batches: list[dict[str, torch.Tensor]], probe: Probe, options: Sequence[LayerOption],
                        embedding_bits: Sequence[int], setup: SensitivitySetup,
                        tick: Callable[[int, int], None] | None = None) -> Curves:
    """Loss curves of every layer and embedding table (see the module docstring); `tick(done, total)`."""
    from .passes.blocks import forward_kwargs

    total = len(layers) + len(embeddings)
    done = 0
    curves = Curves(layers={}, embeddings={})
    stats = layer_statistics(model, layers, batches, forward_kwargs(model))
    for name, layer in layers.items():
        weight = layer.weight.detach().float()
        curve: dict[str, float] = {}
        for option, compressed in compressed_weights(weight, stats[name], options, setup):
            curve[option.label] = probe.loss(name, _linear_with(layer, compressed))
        curves.layers[name] = curve
        del stats[name]
        done += 1
        if tick is not None:
            tick(done, total)
    for name, table in embeddings.items():
        curves.embeddings[name] = {
            str(bits): (0.0 if bits == 32 else probe.loss(name, QuantizedEmbedding.from_embedding(table, bits=bits)))
            for bits in embedding_bits}
        done += 1
        if tick is not None:
            tick(done, total)
    return curves
