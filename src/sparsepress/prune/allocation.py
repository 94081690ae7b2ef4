"""Per-layer sparsity around a mean: uniform, OWL (Yin et al. 2023) or a sensitivity proxy.

Every method returns sparsities whose parameter-weighted mean equals the asked mean, each in [0, 0.99].

Example:
    >>> import torch
    >>> from sparsepress.recipe import PruneStage
    >>> layers = [LayerSummary("a", torch.ones(2, 2), None), LayerSummary("b", torch.ones(4, 4), None)]
    >>> allocate_sparsity("uniform", layers, 0.5, PruneStage(method="wanda", sparsity=0.5))
    {'a': 0.5, 'b': 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ..recipe import PruneStage

MAX_SPARSITY = 0.99


@dataclass(frozen=True)
class LayerSummary:
    """What allocation needs of a layer: its weight, its inputs' squared norms, its transformer block.

    Example:
        >>> import torch
        >>> LayerSummary("fc", torch.zeros(3, 4), torch.ones(4), block=0).block
        0
    """

    name: str
    weight: torch.Tensor
    act_norm_sq: torch.Tensor | None
    block: Hashable | None = None

    @property
    def n_params(self) -> int:
        return self.weight.numel()


def _wanda_scores(layer: LayerSummary) -> torch.Tensor:
    scores = layer.weight.detach().double().abs()
    if layer.act_norm_sq is not None:
        scores = scores * layer.act_norm_sq.detach().double().sqrt().unsqueeze(0)
    return scores


def recentre(
    raw: torch.Tensor, params: torch.Tensor, mean: float, high: float = MAX_SPARSITY
) -> torch.Tensor:
    """Shift `raw` by one constant so that the `params`-weighted mean of clip(raw + c, 0, high) is `mean`.

    Example:
        >>> import torch
        >>> [round(x, 6) for x in recentre(torch.tensor([0.1, 0.3]), torch.tensor([1.0, 1.0]), 0.5).tolist()]
        [0.4, 0.6]
    """
    raw, params = raw.double(), params.double()

    def weighted(shift: float) -> float:
        return float((raw + shift).clamp(0.0, high).mul(params).sum() / params.sum())

    low_shift, high_shift = -float(raw.max()) - 1.0, high - float(raw.min()) + 1.0
    for _ in range(200):
        middle = (low_shift + high_shift) / 2
        if weighted(middle) < mean:
            low_shift = middle
        else:
            high_shift = middle
    return (raw + (low_shift + high_shift) / 2).clamp(0.0, high)


def _allocate_uniform(layers: list[LayerSummary], mean: float, prune: PruneStage) -> list[float]:
    return [mean] * len(layers)


def _outlier_ratios(layers: list[LayerSummary], threshold: float) -> torch.Tensor:
    """Fraction of Wanda scores above `threshold` x the mean score, over each layer's block (or itself)."""
    keys = [layer.block if layer.block is not None else ("layer", layer.name) for layer in layers]
    totals: dict[Hashable, list[float]] = {}
    scores = [_wanda_scores(layer) for layer in layers]
    for key, score in zip(keys, scores):
        entry = totals.setdefault(key, [0.0, 0.0, 0.0])
        entry[0] += float(score.sum())
        entry[1] += score.numel()
    for key, score in zip(keys, scores):
        entry = totals[key]
        entry[2] += float((score > threshold * entry[0] / max(entry[1], 1.0)).sum())
    return torch.tensor([totals[key][2] / max(totals[key][1], 1.0) for key in keys], dtype=torch.float64)


def _allocate_owl(layers: list[LayerSummary], mean: float, prune: PruneStage) -> list[float]:
    ratios = _outlier_ratios(layers, prune.owl_threshold)
    spread = float(ratios.max() - ratios.min())
    if spread <= 0.0:
        return [mean] * len(layers)
    normalised = (ratios - ratios.min()) / spread
    # More outliers -> more important -> less sparsity, within [mean - lambda, mean + lambda].
    raw = mean - prune.owl_lambda * (2.0 * normalised - 1.0)
    params = torch.tensor([layer.n_params for layer in layers], dtype=torch.float64)
    return recentre(raw, params, mean).tolist()


def _allocate_sensitivity(layers: list[LayerSummary], mean: float, prune: PruneStage) -> list[float]:
    # Proxy error of pruning a weight: w^2 * ||x_j||^2 over the layer's total. Each layer's cost is
    # convex in its pruned count (sorted increments), so the optimum at a fixed total count is a global
    # threshold on these normalised costs; bisection finds it, the tie at the threshold is split exactly.
    costs = []
    for layer in layers:
        energy = _wanda_scores(layer).square().flatten()
        total = float(energy.sum())
        costs.append((energy / total if total > 0 else energy).sort().values)
    sizes = [cost.numel() for cost in costs]
    caps = [int(MAX_SPARSITY * size) for size in sizes]
    wanted = round(mean * sum(sizes))

    def counts(threshold: float) -> list[int]:
        return [
            min(int(torch.searchsorted(cost, torch.tensor([threshold], dtype=cost.dtype), right=True)), cap)
            for cost, cap in zip(costs, caps)
        ]

    low, high = -1.0, max(float(cost[-1]) for cost in costs) + 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if sum(counts(middle)) < wanted:
            low = middle
        else:
            high = middle
    below, above = counts(low), counts(high)
    chosen = list(below)
    deficit = wanted - sum(below)
    for index, (lo, hi) in enumerate(zip(below, above)):
        take = min(hi - lo, deficit)
        chosen[index] += take
        deficit -= take
    return [count / size for count, size in zip(chosen, sizes)]


ALLOCATORS: dict[str, Callable[[list[LayerSummary], float, PruneStage], list[float]]] = {
    "uniform": _allocate_uniform,
    "owl": _allocate_owl,
    "sensitivity": _allocate_sensitivity,
}


def allocate_sparsity(
    method: str, layers: list[LayerSummary], mean_sparsity: float, prune: PruneStage
) -> dict[str, float]:
    """Per-layer sparsity (name -> fraction) whose parameter-weighted mean is `mean_sparsity`.

    Example:
        >>> import torch
        >>> from sparsepress.recipe import PruneStage
        >>> g = torch.Generator().manual_seed(0)
        >>> layers = [LayerSummary(n, torch.randn(8, 8, generator=g), torch.rand(8, generator=g))
        ...           for n in "ab"]
        >>> out = allocate_sparsity("sensitivity", layers, 0.5, PruneStage(method="wanda", sparsity=0.5))
        >>> round(sum(out.values()) / 2, 6)
        0.5
    """
    if method not in ALLOCATORS:
        raise ValueError(f"unknown allocation {method!r}; allowed: {' | '.join(ALLOCATORS)}")
    if not 0.0 <= mean_sparsity <= MAX_SPARSITY:
        raise ValueError(f"mean sparsity must be in [0, {MAX_SPARSITY}], got {mean_sparsity}")
    if not layers:
        return {}
    names = [layer.name for layer in layers]
    if len(set(names)) != len(names):
        raise ValueError("layer names given to allocation must be unique")
    return dict(zip(names, (float(s) for s in ALLOCATORS[method](layers, mean_sparsity, prune))))
