"""Per-layer sparsity allocation: the weighted mean holds; OWL and sensitivity move sparsity sensibly."""

from __future__ import annotations

import pytest
import torch

from sparsepress.prune.allocation import LayerSummary, allocate_sparsity
from sparsepress.recipe import PruneStage

STAGE = PruneStage(method="wanda", sparsity=0.5, allocation="owl", owl_lambda=0.1, owl_threshold=5.0)


def _layers(seed: int = 0, outliers: tuple[int, ...] = (0, 2, 4, 8)) -> list[LayerSummary]:
    """Layers of different sizes; layer i gets `outliers[i]` huge weights (a growing outlier fraction)."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for index, count in enumerate(outliers):
        weight = torch.randn(8 + 4 * index, 16, generator=g)
        weight.view(-1)[torch.randperm(weight.numel(), generator=g)[:count]] = 100.0
        layers.append(LayerSummary(f"l{index}", weight, torch.rand(16, generator=g) + 0.5))
    return layers


def _weighted_mean(layers: list[LayerSummary], sparsity: dict[str, float]) -> float:
    total = sum(layer.weight.numel() for layer in layers)
    return sum(sparsity[layer.name] * layer.weight.numel() for layer in layers) / total


@pytest.mark.parametrize("method", ["uniform", "owl", "sensitivity"])
@pytest.mark.parametrize("mean", [0.0, 0.3, 0.5, 0.9])
def test_weighted_mean_is_preserved_and_values_are_in_range(method, mean):
    layers = _layers()
    sparsity = allocate_sparsity(method, layers, mean, STAGE)
    assert list(sparsity) == [layer.name for layer in layers]
    assert abs(_weighted_mean(layers, sparsity) - mean) <= 1e-3
    assert all(0.0 <= value <= 0.99 for value in sparsity.values())


def test_uniform_gives_the_mean_everywhere():
    assert set(allocate_sparsity("uniform", _layers(), 0.4, STAGE).values()) == {0.4}


def test_owl_prunes_layers_with_more_outliers_less():
    sparsity = allocate_sparsity("owl", _layers(), 0.5, STAGE)
    values = [sparsity[f"l{i}"] for i in range(4)]
    assert values == sorted(values, reverse=True)
    assert values[0] > values[-1]
    assert max(values) - min(values) <= 2 * STAGE.owl_lambda + 1e-6


def test_owl_without_outlier_differences_is_uniform():
    layers = _layers(outliers=(0, 0, 0, 0))
    stage = STAGE.model_copy(update={"owl_threshold": 1000.0})
    assert set(allocate_sparsity("owl", layers, 0.5, stage).values()) == {0.5}


def test_owl_per_block_gives_one_sparsity_per_block():
    base = _layers()
    layers = [
        LayerSummary(layer.name, layer.weight, layer.act_norm_sq, block=index // 2)
        for index, layer in enumerate(base)
    ]
    sparsity = allocate_sparsity("owl", layers, 0.5, STAGE)
    assert sparsity["l0"] == sparsity["l1"] and sparsity["l2"] == sparsity["l3"]
    assert sparsity["l0"] > sparsity["l2"]
    assert abs(_weighted_mean(layers, sparsity) - 0.5) <= 1e-3


def test_sensitivity_prunes_concentrated_layers_more():
    g = torch.Generator().manual_seed(1)
    flat = torch.ones(16, 16)  # every weight matters equally: pruning hurts proportionally
    peaked = torch.randn(16, 16, generator=g) * 0.01
    peaked[:, :2] = 10.0  # a few weights hold nearly all the energy: the rest is cheap to prune
    layers = [LayerSummary("flat", flat, torch.ones(16)), LayerSummary("peaked", peaked, torch.ones(16))]
    sparsity = allocate_sparsity("sensitivity", layers, 0.5, STAGE)
    assert sparsity["peaked"] > 0.8 and sparsity["flat"] < 0.2
    assert abs(_weighted_mean(layers, sparsity) - 0.5) <= 1e-3


def test_high_mean_respects_the_cap():
    layers = _layers()
    for method in ("owl", "sensitivity"):
        sparsity = allocate_sparsity(method, layers, 0.98, STAGE)
        assert max(sparsity.values()) <= 0.99
        assert abs(_weighted_mean(layers, sparsity) - 0.98) <= 1e-3


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="unknown allocation"):
        allocate_sparsity("random", _layers(), 0.5, STAGE)
    with pytest.raises(ValueError, match="unique"):
        allocate_sparsity("uniform", _layers()[:1] * 2, 0.5, STAGE)
    assert allocate_sparsity("owl", [], 0.5, STAGE) == {}
