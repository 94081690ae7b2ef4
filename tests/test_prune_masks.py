"""Masks of every pattern obey their constraint exactly; statistics and scorers are what the papers say."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsepress.errors import PoisonedWeightError
from sparsepress.prune.magnitude import score_magnitude
from sparsepress.prune.masks import (
    MaskSpec,
    count_kept,
    count_pruned,
    prune_lowest,
    prune_lowest_per_row,
    satisfies,
    select_mask,
)
from sparsepress.prune.stats import LayerStats
from sparsepress.prune.wanda import score_wanda
from sparsepress.recipe import PruneStage

FAST = settings(max_examples=40, deadline=None)


def _scores(rows: int, cols: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@FAST
@given(st.integers(1, 6), st.integers(1, 40), st.floats(0.0, 0.95), st.integers(0, 10_000))
def test_unstructured_prunes_exact_count_of_lowest_per_row(rows, cols, sparsity, seed):
    scores = _scores(rows, cols, seed)
    keep = select_mask(scores, MaskSpec("unstructured", sparsity))
    pruned_per_row = (~keep).sum(dim=1)
    assert torch.all(pruned_per_row == count_pruned(cols, sparsity))
    for row in range(rows):
        if keep[row].any() and (~keep[row]).any():
            assert scores[row][keep[row]].min() > scores[row][~keep[row]].max()


@FAST
@given(st.integers(1, 6), st.integers(1, 40), st.integers(0, 10_000), st.data())
def test_kth_value_pruning_equals_the_stable_sort_with_ties(rows, cols, seed, data):
    # Few distinct values, so rows are full of ties: both must prune the lowest, ties lowest index first.
    scores = torch.randint(0, 4, (rows, cols), generator=torch.Generator().manual_seed(seed)).float()
    count = data.draw(st.integers(0, cols))
    fast = prune_lowest(scores, count)
    reference = prune_lowest_per_row(scores, torch.full((rows,), count))
    assert torch.equal(fast, reference)


@FAST
@given(st.integers(1, 5), st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
       st.integers(1, 5), st.integers(0, 10_000))
def test_nm_keeps_exactly_n_of_every_m(rows, nm, groups, seed):
    n, m = nm
    keep = select_mask(_scores(rows, groups * m, seed), MaskSpec("nm", 1 - n / m, n=n, m=m))
    assert torch.all(keep.view(rows, groups, m).sum(dim=2) == n)


def test_nm_rejects_width_not_divisible_and_names_the_shape():
    with pytest.raises(ValueError, match=r"\(3, 6\)"):
        select_mask(torch.rand(3, 6), MaskSpec("nm", 0.5, n=2, m=4))


@FAST
@given(st.integers(1, 5), st.integers(1, 40), st.integers(2, 9), st.floats(0.0, 0.95), st.integers(0, 10_000))
def test_bbs_keeps_the_same_count_in_every_bank(rows, cols, bank, sparsity, seed):
    keep = select_mask(_scores(rows, cols, seed), MaskSpec("bbs", sparsity, bank=bank))
    full = cols // bank * bank
    if full:
        assert torch.all(keep[:, :full].reshape(rows, -1, bank).sum(dim=2) == count_kept(bank, sparsity))
    if full < cols:
        assert torch.all(keep[:, full:].sum(dim=1) == count_kept(cols - full, sparsity))


@FAST
@given(st.integers(1, 9), st.integers(1, 20), st.integers(1, 4), st.integers(1, 5), st.floats(0.0, 0.95),
       st.integers(0, 10_000))
def test_block_prunes_whole_blocks_close_to_target(rows, cols, br, bc, sparsity, seed):
    keep = select_mask(_scores(rows, cols, seed), MaskSpec("block", sparsity, block_shape=(br, bc)))
    for r0 in range(0, rows, br):
        for c0 in range(0, cols, bc):
            tile = keep[r0 : r0 + br, c0 : c0 + bc]
            assert tile.all() or not tile.any()
    pruned = int((~keep).sum())
    assert abs(pruned - sparsity * rows * cols) <= br * bc / 2 + 1e-9


def test_block_prunes_lowest_mean_blocks():
    scores = torch.tensor([[9.0, 9.0, 1.0, 1.0], [9.0, 9.0, 1.0, 2.0]])
    keep = select_mask(scores, MaskSpec("block", 0.5, block_shape=(2, 2)))
    assert keep.tolist() == [[True, True, False, False], [True, True, False, False]]


@pytest.mark.parametrize(
    "spec", [MaskSpec("unstructured", 0.5), MaskSpec("nm", 0.5, n=2, m=4), MaskSpec("bbs", 0.5, bank=4),
             MaskSpec("block", 0.5, block_shape=(2, 2)), MaskSpec("block", 0.5, block_shape=(3, 3))]
)
def test_satisfies_accepts_selected_masks_and_rejects_perturbed_ones(spec):
    keep = select_mask(_scores(4, 8, 1), spec)
    assert satisfies(keep, spec)
    broken = keep.clone()
    broken[0, 0] = ~broken[0, 0]
    assert not satisfies(broken, spec)
    assert not satisfies(torch.ones_like(keep), spec)


@pytest.mark.parametrize("pattern", ["channel", "head", "layer"])
def test_structured_patterns_are_refused_with_a_clear_message(pattern):
    with pytest.raises(ValueError, match="structured pruning"):
        select_mask(torch.rand(2, 4), MaskSpec(pattern, 0.5))
    with pytest.raises(ValueError, match="structured pruning"):
        MaskSpec.from_stage(PruneStage(method="magnitude", pattern=pattern, sparsity=0.5))


def test_spec_from_stage_resolves_sparsity():
    assert MaskSpec.from_stage(PruneStage(method="wanda", pattern="2:4")).sparsity == 0.5
    assert MaskSpec.from_stage(PruneStage(method="wanda", sparsity=0.3)).sparsity == 0.3
    elastic = PruneStage(method="wanda", sparsity=[0.5, 0.7])
    assert MaskSpec.from_stage(elastic, 0.7).sparsity == 0.7
    with pytest.raises(ValueError, match="explicitly"):
        MaskSpec.from_stage(elastic)
    with pytest.raises(ValueError, match="implies"):
        MaskSpec.from_stage(PruneStage(method="wanda", pattern="2:4"), 0.7)


def test_counts_round_half_up():
    assert (count_pruned(10, 0.25), count_kept(10, 0.25), count_kept(64, 0.7)) == (3, 8, 19)


def test_layer_stats_accumulate_mean_normalised_hessian_and_activation_energy():
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
    stats = LayerStats(3)
    stats.add(x[0])
    stats.add(x[1])
    flat = x.reshape(-1, 3).double()
    assert stats.n_tokens == 10
    assert torch.allclose(stats.hessian, 2 / 10 * flat.T @ flat)
    assert torch.allclose(stats.act_norm_sq, (flat**2).sum(0).float())


def test_layer_stats_reject_poisoned_or_misshaped_input():
    stats = LayerStats(2, name="enc.fc1")
    with pytest.raises(PoisonedWeightError, match="enc.fc1.*calibration activations"):
        stats.add(torch.tensor([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="3 features"):
        stats.add(torch.ones(1, 3))
    with pytest.raises(ValueError, match="no calibration tokens"):
        _ = stats.hessian


def test_wanda_scores_weight_times_input_norm():
    stats = LayerStats(2)
    stats.add(torch.tensor([[3.0, 0.1], [4.0, 0.0]]))
    weight = torch.tensor([[0.5, -10.0]])
    assert torch.allclose(score_wanda(weight, stats), torch.tensor([[2.5, 1.0]]))
    assert torch.equal(score_magnitude(weight), torch.tensor([[0.5, 10.0]]))
    # Wanda keeps the small weight on the loud input; magnitude keeps the big weight.
    spec = MaskSpec("unstructured", 0.5)
    assert select_mask(score_wanda(weight, stats), spec).tolist() == [[True, False]]
    assert select_mask(score_magnitude(weight), spec).tolist() == [[False, True]]
