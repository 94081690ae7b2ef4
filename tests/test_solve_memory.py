"""The layer solve's memory-saving routes give the very bits of the routes they replaced."""

from __future__ import annotations

import pytest
import torch

from sparsepress.prune.admm import _CholeskyRidge
from sparsepress.prune.sparsegpt import FixedSelector, inverse_hessian_cholesky, obs_sweep
from sparsepress.prune.stats import LayerStats


def _stats(width: int, dead: int = 0, seed: int = 0) -> LayerStats:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * width, width, generator=g) * torch.rand(width, generator=g)
    x[:, :dead] = 0.0
    stats = LayerStats(width)
    for part in x.split(width):
        stats.add(part, part + 0.1 * torch.randn(part.shape, generator=g))
    return stats


def test_settled_statistics_keep_every_result_and_drop_the_sums():
    stats = _stats(40)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(8, 40, generator=g), torch.randn(5, 40, generator=g)]
    targets = [stats.dense_target(w, 0.3, 0.02) for w in weights]
    hessian, norms = stats.hessian, stats.act_norm_sq
    gap = stats.bias_gap(weights[0], targets[0])
    settled = stats.settle(weights, 0.3, 0.02)
    assert all(torch.equal(a, b) for a, b in zip(settled, targets))
    assert torch.equal(stats.hessian, hessian) and stats.hessian is stats.hessian  # one tensor, no copy per read
    assert torch.equal(stats.act_norm_sq, norms) and torch.equal(stats.bias_gap(weights[0], targets[0]), gap)
    assert stats.tracks_dense and stats._cross is None and stats._xtx is None
    for settled_only in (lambda: stats.xtx, lambda: stats.add(torch.ones(1, 40)), lambda: stats.dense_target(weights[0], 0.3)):
        with pytest.raises(ValueError, match="settled"):
            settled_only()
    assert all(a is b for a, b in zip(stats.settle(weights, 0.3), weights))  # a second call changes nothing


@pytest.mark.parametrize("dead", [0, 3])
def test_factor_in_sweep_order_equals_the_factor_of_the_permuted_copy(dead):
    hessian = _stats(60, dead).hessian
    order = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    in_order = inverse_hessian_cholesky(hessian, 0.01, order=order)
    assert torch.equal(in_order, inverse_hessian_cholesky(hessian[order][:, order], 0.01))
    assert torch.equal(inverse_hessian_cholesky(hessian, 0.01, order=order, dtype=torch.float32), in_order.float())


@pytest.mark.parametrize("dead", [0, 3])
def test_sweep_in_order_equals_the_sweep_of_permuted_copies(dead):
    hessian = _stats(70, dead, seed=3).hessian
    g = torch.Generator().manual_seed(4)
    weight, pruned = torch.randn(6, 70, generator=g), torch.rand(6, 70, generator=g) < 0.5
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True)
    swept = obs_sweep(weight, hessian, dampening=0.01, blocksize=16, selector=FixedSelector(pruned[:, order]), order=order)
    permuted = obs_sweep(weight[:, order], hessian[order][:, order], dampening=0.01, blocksize=16,
                         selector=FixedSelector(pruned[:, order]))
    inverse = torch.argsort(order)
    assert torch.equal(swept.weight, permuted.weight[:, inverse]) and torch.equal(swept.pruned, pruned)


def test_ridge_solves_in_one_buffer_equal_fresh_factors():
    hessian = _stats(50, dead=2, seed=5).hessian
    work = hessian.clone()
    work.diagonal().masked_fill_(work.diagonal() == 0, 1.0).add_(0.3)
    ridge = _CholeskyRidge(hessian, work.diagonal().clone())
    rhs = torch.randn(7, 50, generator=torch.Generator().manual_seed(6))
    for rho in (0.1, 2.0, 0.5):
        shifted = work.clone()
        shifted.diagonal().add_(rho)
        fresh = torch.cholesky_solve(rhs.T, torch.linalg.cholesky(shifted).float()).T
        assert torch.equal(ridge.solve(rhs, rho), fresh)


def test_refit_in_row_chunks_equals_the_whole_rows(monkeypatch):
    from sparsepress.prune import refit

    hessian = _stats(90, dead=2, seed=7).hessian
    g = torch.Generator().manual_seed(8)
    weight, keep = torch.randn(600, 90, generator=g), torch.rand(600, 90, generator=g) < 0.5
    chunked = refit.refit_kept(weight, hessian, keep)
    monkeypatch.setattr(refit, "ROW_CHUNK", 10_000)  # the reference: every row in one float64 temporary
    assert torch.equal(chunked, refit.refit_kept(weight, hessian, keep))
