"""SparseGPT / Wanda / magnitude via `compress_weight`: constraints, equivalences, reconstruction error."""

from __future__ import annotations

import math

import pytest
import torch

from sparsepress.errors import PoisonedWeightError
from sparsepress.prune.masks import MaskSpec, satisfies
from sparsepress.prune.solve import compress_weight
from sparsepress.prune.sparsegpt import inverse_hessian_cholesky
from sparsepress.prune.stats import LayerStats
from sparsepress.recipe import PruneStage


def _layer(out: int = 16, inp: int = 32, tokens: int = 256, seed: int = 0):
    """A weight and statistics of strongly correlated, unevenly scaled inputs (where OBS pays off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + torch.randn(inp, inp, generator=g) / math.sqrt(inp)
    x = torch.randn(tokens, inp, generator=g) @ mix * (0.2 + 3 * torch.rand(inp, generator=g))
    stats = LayerStats(inp, name="fc")
    stats.add(x)
    return torch.randn(out, inp, generator=g), x, stats


def _output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight - approx).T) ** 2).sum())


def _stage(method: str, pattern: str = "unstructured", **extra) -> PruneStage:
    if ":" not in pattern:
        extra.setdefault("sparsity", 0.5)
    return PruneStage(method=method, pattern=pattern, **extra)


def test_sparsegpt_with_identity_hessian_matches_magnitude_per_row():
    weight = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    stats = LayerStats(16)
    stats.add(torch.eye(16))  # H proportional to I: no cross-column compensation
    magnitude = compress_weight(weight, None, _stage("magnitude", sparsity=0.4))
    for blocksize in (4, 5, 128):
        sparse = compress_weight(weight, stats, _stage("sparsegpt", sparsity=0.4, blocksize=blocksize))
        assert torch.equal(sparse.mask, magnitude.mask)
        assert torch.allclose(sparse.weight, magnitude.weight)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "bbs", "block"])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(pattern):
    weight, x, stats = _layer()
    extra = {"bank": 8, "block_shape": (2, 4), "blocksize": 8}
    errors = {
        method: _output_error(
            weight, compress_weight(weight, stats, _stage(method, pattern, **extra)).weight, x
        )
        for method in ("magnitude", "wanda", "sparsegpt")
    }
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"]


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(
    "pattern, extra",
    [("unstructured", {}), ("2:4", {}), ("1:4", {}), ("bbs", {"bank": 8}), ("bbs", {"bank": 12}),
     ("block", {"block_shape": (4, 4)}), ("block", {"block_shape": (3, 5)})],
)
def test_every_method_and_pattern_satisfies_its_constraint(method, pattern, extra):
    weight, _, stats = _layer()
    stage = _stage(method, pattern, blocksize=8, **extra)
    result = compress_weight(weight, stats, stage)
    assert result.mask is not None and result.mask.dtype == torch.bool and result.mask.shape == weight.shape
    assert satisfies(result.mask, MaskSpec.from_stage(stage))
    assert torch.all(result.weight[~result.mask] == 0)
    assert result.scales is None and result.bits is None and result.weight.dtype == torch.float32


def test_bbs_sparsegpt_with_bank_wider_than_blocksize_and_partial_bank():
    weight, _, stats = _layer(inp=32)
    stage = _stage("sparsegpt", "bbs", bank=12, blocksize=5, sparsity=0.7)
    result = compress_weight(weight, stats, stage)
    assert satisfies(result.mask, MaskSpec.from_stage(stage))
    assert torch.all(result.mask[:, :24].reshape(16, 2, 12).sum(2) == 4)
    assert torch.all(result.mask[:, 24:].sum(1) == 2)


def test_input_weight_is_not_modified():
    weight, _, stats = _layer()
    before = weight.clone()
    compress_weight(weight, stats, _stage("sparsegpt"))
    assert torch.equal(weight, before)


def test_dead_inputs_are_zeroed_and_do_not_break_the_solve():
    weight, x, _ = _layer()
    x[:, 3] = 0.0
    stats = LayerStats(32)
    stats.add(x)
    result = compress_weight(weight, stats, _stage("sparsegpt"))
    assert torch.isfinite(result.weight).all()
    assert torch.all(result.weight[:, 3] == 0)


def test_elastic_levels_need_explicit_sparsity_and_honour_it():
    weight, _, stats = _layer()
    stage = PruneStage(method="sparsegpt", sparsity=[0.5, 0.75])
    with pytest.raises(ValueError, match="explicitly"):
        compress_weight(weight, stats, stage)
    result = compress_weight(weight, stats, stage, sparsity=0.75)
    assert torch.all((~result.mask).sum(1) == 24)


def test_unpruned_unquantized_is_a_copy():
    weight, _, _ = _layer()
    result = compress_weight(weight, None)
    assert torch.equal(result.weight, weight) and result.mask is None and result.weight is not weight


def test_clear_errors():
    weight, _, stats = _layer()
    with pytest.raises(ValueError, match="sparsegpt needs calibration"):
        compress_weight(weight, None, _stage("sparsegpt"))
    with pytest.raises(ValueError, match="wanda needs calibration"):
        compress_weight(weight, None, _stage("wanda"))
    with pytest.raises(ValueError, match="structured pruning"):
        compress_weight(weight, stats, _stage("sparsegpt", "channel"))
    narrow = LayerStats(30)
    narrow.add(torch.eye(30))
    with pytest.raises(ValueError, match=r"\(16, 30\)"):
        compress_weight(torch.randn(16, 30), narrow, _stage("sparsegpt", "2:4"))
    with pytest.raises(ValueError, match=r"\(16, 30\)"):
        compress_weight(torch.randn(16, 30), None, _stage("magnitude", "2:4"))
    poisoned = weight.clone()
    poisoned[0, 0] = math.inf
    with pytest.raises(PoisonedWeightError, match="fc: NaN or Inf in weight"):
        compress_weight(poisoned, stats, _stage("magnitude"))
    with pytest.raises(ValueError, match="32 inputs"):
        compress_weight(torch.randn(4, 8), stats, _stage("magnitude"))


@pytest.mark.parametrize("width, dead", [(7, 0), (96, 5), (300, 0)])
def test_inverse_hessian_factor_matches_the_reference_route(width, dead):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(4 * width, width, generator=g) @ (torch.eye(width) + torch.randn(width, width, generator=g) / width**0.5)
    x[:, :dead] = 0.0
    hessian = x.T.double() @ x.double()
    fast = inverse_hessian_cholesky(hessian, 0.01)
    reference = inverse_hessian_cholesky(hessian, 0.01, reference=True)
    assert torch.equal(fast, fast.triu()) and bool((fast.diagonal() > 0).all())
    assert torch.allclose(fast, reference, rtol=1e-9, atol=1e-12 * float(reference.abs().max()))
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    assert torch.allclose(fast.T @ fast @ damped, torch.eye(width, dtype=torch.float64), atol=1e-8)
