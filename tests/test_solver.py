"""The calibrated solve's refinements: least-squares refit, dense target, bias gap, sequential groups."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress.calibration import make_batches
from sparsepress.evaluate import mean_cosine, pooled_output
from sparsepress.experts.calibration import LayerCalibration
from sparsepress.passes.blocks import capture_block_inputs, layer_inputs
from sparsepress.passes.context import CompressionContext
from sparsepress.passes.layer_solve import BlockSolver
from sparsepress.prune.refit import damped, refit_kept
from sparsepress.prune.solve import compress_weight
from sparsepress.prune.stats import LayerStats
from sparsepress.recipe import PruneStage, QuantizeStage, Recipe, RecipeError


def _inputs(tokens: int, inp: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + torch.randn(inp, inp, generator=g) / math.sqrt(inp)
    return torch.randn(tokens, inp, generator=g) @ mix * (0.2 + 3 * torch.rand(inp, generator=g))


def _direct_refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, dampening: float) -> torch.Tensor:
    """Reference: each row's kept entries solved exactly, one row at a time."""
    work = damped(hessian, dampening)
    out = torch.zeros(weight.shape, dtype=torch.float64)
    for row in range(weight.shape[0]):
        kept = torch.nonzero(keep[row]).squeeze(1)
        if len(kept):
            rhs = (work @ weight[row].double())[kept]
            out[row, kept] = torch.linalg.solve(work[kept][:, kept], rhs)
    return out.float()


def _h_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (weight - approx).double()
    return float(((delta @ hessian) * delta).sum())


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 9), inp=st.integers(2, 40), density=st.floats(0.1, 0.9), seed=st.integers(0, 1000))
def test_refit_matches_a_per_row_direct_solve(out, inp, density, seed):
    g = torch.Generator().manual_seed(seed)
    x = _inputs(4 * inp, inp, seed)
    hessian = (x.T @ x).double()
    weight = torch.randn(out, inp, generator=g)
    keep = torch.rand(out, inp, generator=g) < density  # rows keep different counts
    fast = refit_kept(weight, hessian, keep, dampening=0.01)
    reference = _direct_refit(weight, hessian, keep, 0.01)
    assert bool((fast[~keep] == 0).all())
    work = damped(hessian, 0.01)
    # The iterative solve (float32 products) reaches the exact optimum's error, what it minimises, to 1e-4.
    best = _h_error(weight, reference, work)
    assert _h_error(weight, fast, work) <= best * (1 + 1e-4) + 1e-7 * _h_error(weight, torch.zeros_like(weight), work)


def test_refit_never_loses_to_its_start_and_leaves_identity_hessians_alone():
    x = _inputs(512, 48, 3)
    hessian = (x.T @ x).double()
    weight = torch.randn(12, 48, generator=torch.Generator().manual_seed(1))
    stage = PruneStage(method="sparsegpt", sparsity=0.6)
    stats = LayerStats(48)
    stats.add(x)
    pruned = compress_weight(weight, stats, prune=stage)
    refitted = compress_weight(weight, stats, prune=stage, refit=True)
    assert torch.equal(refitted.mask, pruned.mask)
    assert _h_error(weight, refitted.weight, hessian) < _h_error(weight, pruned.weight, hessian)
    keep = weight.abs() > 0.5
    assert torch.allclose(refit_kept(weight, torch.eye(48, dtype=torch.float64), keep), weight * keep, atol=1e-6)


def test_refit_with_gptq_keeps_the_mask_and_the_grid():
    x = _inputs(256, 32, 5)
    stats = LayerStats(32)
    stats.add(x)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(2))
    out = compress_weight(weight, stats, prune=PruneStage(method="wanda", pattern="2:4"),
                          quant=QuantizeStage(method="gptq", bits=8), refit=True)
    assert bool((out.mask.reshape(8, 8, 4).sum(-1) == 2).all())
    assert bool((out.weight[~out.mask] == 0).all())
    q = out.weight / out.scales
    assert torch.allclose(q, q.round(), atol=1e-4) and float(q.abs().max()) <= 127


def test_refit_ignores_dead_inputs():
    hessian = torch.diag(torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    out = refit_kept(torch.tensor([[1.0, 5.0, -1.0]]), hessian, torch.ones(1, 3, dtype=torch.bool))
    assert out[0, 1] == 0
    assert torch.allclose(out, torch.tensor([[1.0, 0.0, -1.0]]), atol=1e-5)


def test_dense_target_is_the_least_squares_fit_to_the_dense_outputs():
    dense_x = _inputs(300, 10, 7)
    x = dense_x + 0.3 * torch.randn(300, 10, generator=torch.Generator().manual_seed(8))  # what the compressed model feeds
    weight = torch.randn(4, 10, generator=torch.Generator().manual_seed(9))
    stats = LayerStats(10)
    stats.add(x, dense_x=dense_x)
    full = stats.dense_target(weight, 1.0, dampening=0.0)
    solution = torch.linalg.lstsq(x.double(), (dense_x @ weight.T).double()).solution.T.float()
    assert torch.allclose(full, solution, atol=1e-4)
    half = stats.dense_target(weight, 0.5, dampening=0.0)
    assert torch.allclose(half, (weight + solution) / 2, atol=1e-4)
    assert torch.equal(stats.dense_target(weight, 0.0), weight)


def test_bias_gap_is_the_mean_output_difference():
    dense_x, x = _inputs(64, 6, 1), _inputs(64, 6, 2)
    stats = LayerStats(6)
    stats.add(x[:40], dense_x=dense_x[:40])
    stats.add(x[40:], dense_x=dense_x[40:])
    dense_w, w = torch.randn(3, 6), torch.randn(3, 6)
    expected = (dense_x @ dense_w.T - x @ w.T).mean(dim=0)
    assert torch.allclose(stats.bias_gap(dense_w, w), expected, atol=1e-4)
    with pytest.raises(ValueError, match="paired"):
        LayerStats(6).bias_gap(dense_w, w)


def test_sequential_groups_follow_the_forward_and_share_inputs():
    model = tiny_bert()
    recipe = Recipe.model_validate({"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}]})
    runner = BlockSolver(CompressionContext(model, recipe))
    batches = make_batches(token_ids(2), 2, 0)
    name, block = runner.layout.blocks[0]
    inputs = capture_block_inputs(model, block, batches)
    members = {n: l for n, l in runner.layers.items() if n.startswith(name + ".")}
    groups = runner._solve_groups(block, members, inputs)
    short = [[n[len(name) + 1:] for n in g] for g in groups]
    assert short == [["attention.self.query", "attention.self.key", "attention.self.value"],
                     ["attention.output.dense"], ["intermediate.dense"], ["output.dense"]]


def _calibration_cosine(solver: dict) -> float:
    dense = tiny_bert()
    ids = token_ids(16, length=16)
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.6}}, {"quantize": {"method": "gptq"}}],
              "solver": solver}
    model = sp.compress(tiny_bert(), recipe, calibration=ids)
    batch = make_batches(ids, 16, 0)[0]
    return mean_cosine(pooled_output(model, batch), pooled_output(dense, batch))


def test_the_default_solver_tracks_the_dense_model_closer_than_the_plain_one():
    plain = _calibration_cosine({"sequential": False, "dense_target": 0.0, "refit": False, "bias_correction": False,
                                 "mask_search": 0})
    default = _calibration_cosine({})
    assert 1 - default < 0.8 * (1 - plain), (plain, default)


def test_solver_values_are_validated():
    with pytest.raises(RecipeError, match="solver.dense_target"):
        Recipe.from_yaml_text("stages:\n  - prune: {sparsity: 0.5}\nsolver: {dense_target: 1.5}\n")
    with pytest.raises(RecipeError, match="known keys: sequential, dense_target, refit, bias_correction, mask_search"):
        Recipe.from_yaml_text("stages:\n  - prune: {sparsity: 0.5}\nsolver:\n  refits: true\n")


def test_statistics_passes_stop_after_the_group_and_see_the_same_inputs():
    model = tiny_bert()
    batches = make_batches(token_ids(2), 2, 0)
    block = model.encoder.layer[0]
    item = capture_block_inputs(model, block, batches)[0]
    group = {"attention.self.query": block.attention.self.query, "attention.self.key": block.attention.self.key}
    calls = []
    handle = block.output.dense.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        full = layer_inputs(block, group, item)
        assert len(calls) == 1
        stopped = layer_inputs(block, group, item, stop=True)
    finally:
        handle.remove()
    assert len(calls) == 1  # the stopped pass never reached the FFN
    assert stopped.keys() == full.keys()
    assert all(torch.equal(stopped[n], full[n]) for n in full)
    assert stopped["attention.self.query"] is stopped["attention.self.key"]  # shared inputs stay shared


@pytest.mark.parametrize("solver", [{}, {"dense_target": 0.0, "bias_correction": False}])
def test_stopping_statistics_passes_early_changes_no_weight(monkeypatch, solver):
    ids = token_ids(8, length=12)
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq"}}],
              "solver": solver, "format": "dense"}

    def weights() -> dict[str, torch.Tensor]:
        model = sp.compress(tiny_bert(), recipe, calibration=ids)
        return {f"{n}.{part}": t for n, m in model.named_modules() if hasattr(m, "packed")
                for part, t in (("weight", m.packed.unpack()), ("bias", m.bias)) if t is not None}

    fast = weights()
    monkeypatch.setattr(LayerCalibration, "stops_early", False)  # the reference: every pass runs the whole block
    full = weights()
    assert fast.keys() == full.keys() and len(fast) > 0
    assert all(torch.equal(fast[n], full[n]) for n in full)
