"""Quantization: grid contract, RTN, GPTQ (alone, after a fixed mask, joint with SparseGPT), embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsepress.prune.solve import CompressedWeight, compress_weight
from sparsepress.prune.stats import LayerStats
from sparsepress.quant.embeddings import dequantize_rows, quantize_rows
from sparsepress.quant.grid import expand_scales
from sparsepress.recipe import PruneStage, QuantizeStage

RANGES = {8: (-127, 127), 4: (-8, 7)}


def _layer(out: int = 16, inp: int = 32, tokens: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(inp) + torch.randn(inp, inp, generator=g) / math.sqrt(inp)
    x = torch.randn(tokens, inp, generator=g) @ mix * (0.2 + 3 * torch.rand(inp, generator=g))
    stats = LayerStats(inp)
    stats.add(x)
    return torch.randn(out, inp, generator=g), x, stats


def _identity_stats(inp: int) -> LayerStats:
    stats = LayerStats(inp)
    stats.add(torch.eye(inp))
    return stats


def _output_error(weight: torch.Tensor, approx: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ (weight - approx).T) ** 2).sum())


def _assert_on_grid(result: CompressedWeight, bits: int, group_size: int | None) -> None:
    rows, cols = result.weight.shape
    groups = 1 if group_size is None else math.ceil(cols / group_size)
    assert result.bits == bits and result.group_size == group_size
    assert result.scales is not None and result.scales.dtype == torch.float32
    assert result.scales.shape == (rows, groups) and torch.all(result.scales > 0)
    scales = expand_scales(result.scales, cols, group_size)
    q = torch.round(result.weight / scales)
    low, high = RANGES[bits]
    assert q.min() >= low and q.max() <= high
    assert torch.equal(q.float() * scales, result.weight)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 24), st.sampled_from([4, 8]), st.sampled_from([None, 8, 16]),
       st.integers(0, 10_000))
def test_rtn_obeys_the_grid_and_rounds_to_nearest(rows, cols, bits, group_size, seed):
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    weight[0] = 0.0  # an all-zero row must still get a positive scale
    stage = QuantizeStage(method="rtn", bits=bits, group_size=group_size)
    result = compress_weight(weight, None, quant=stage)
    _assert_on_grid(result, bits, group_size)
    scales = expand_scales(result.scales, cols, group_size)
    assert torch.all((result.weight - weight).abs() <= scales / 2 + 1e-6)
    assert torch.all(result.weight[0] == 0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [None, 8, 12])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_obeys_the_grid_and_beats_rtn_on_correlated_inputs(bits, group_size, act_order):
    weight, x, stats = _layer()
    stage = dict(bits=bits, group_size=group_size, act_order=act_order, blocksize=8)
    gptq = compress_weight(weight, stats, quant=QuantizeStage(method="gptq", **stage))
    rtn = compress_weight(weight, None, quant=QuantizeStage(method="rtn", **stage))
    _assert_on_grid(gptq, bits, group_size)
    assert gptq.mask is None
    assert _output_error(weight, gptq.weight, x) <= _output_error(weight, rtn.weight, x)


@pytest.mark.parametrize("group_size", [None, 8])
@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_with_identity_hessian_equals_rtn(group_size, bits):
    weight = torch.randn(6, 24, generator=torch.Generator().manual_seed(1))
    for act_order in (False, True):
        stage = dict(bits=bits, group_size=group_size, act_order=act_order, blocksize=5)
        gptq = compress_weight(weight, _identity_stats(24), quant=QuantizeStage(method="gptq", **stage))
        rtn = compress_weight(weight, None, quant=QuantizeStage(method="rtn", **stage))
        assert torch.equal(gptq.weight, rtn.weight)
        assert torch.equal(gptq.scales, rtn.scales)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_prune_then_gptq_keeps_the_mask_and_its_zeros(method, pattern):
    weight, x, stats = _layer()
    sparsity = {"sparsity": 0.5} if pattern == "unstructured" else {}
    prune = PruneStage(method=method, pattern=pattern, **sparsity)
    quant = QuantizeStage(method="gptq", bits=4, group_size=8, act_order=True, blocksize=8)
    pruned = compress_weight(weight, stats, prune)
    joint = compress_weight(weight, stats, prune, quant=quant)
    rtn = compress_weight(weight, stats, prune, quant=QuantizeStage(method="rtn", bits=4, group_size=8))
    assert torch.equal(joint.mask, pruned.mask) and torch.equal(rtn.mask, pruned.mask)
    assert torch.all(joint.weight[~joint.mask] == 0) and torch.all(rtn.weight[~rtn.mask] == 0)
    _assert_on_grid(joint, 4, 8)
    _assert_on_grid(rtn, 4, 8)
    assert _output_error(weight, joint.weight, x) <= _output_error(weight, rtn.weight, x)


@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "bbs", "block"])
def test_sparsegpt_with_gptq_keeps_pattern_zeros_and_grid(pattern):
    weight, _, stats = _layer()
    extra = {"sparsity": 0.5} if ":" not in pattern else {}
    prune = PruneStage(method="sparsegpt", pattern=pattern, bank=8, block_shape=(2, 4), blocksize=8, **extra)
    result = compress_weight(weight, stats, prune, quant=QuantizeStage(method="gptq", bits=4, group_size=16))
    assert result.mask is not None and torch.all(result.weight[~result.mask] == 0)
    assert int((~result.mask).sum()) == pytest.approx(weight.numel() / 2, abs=4)
    _assert_on_grid(result, 4, 16)


def _naive_joint_reference(weight, hessian, scales, bits, target, blocksize, dampening=0.01):
    """Column-by-column OBS: re-invert H over the columns still to come at every step (no Cholesky tricks).

    Mask: at each block start, per row, the `target - pruned so far` lowest saliencies w^2 / [H_F^-1]_jj
    among unprocessed columns, committed for the block. Kept weights are rounded to the grid.
    """
    w = weight.double().clone()
    eye = torch.eye(hessian.shape[0], dtype=torch.float64)
    h = hessian.double() + dampening * hessian.diagonal().mean() * eye
    rows, cols = w.shape
    low, high = RANGES[bits]
    own = torch.tensor([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(cols)], dtype=torch.float64)
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    for j in range(cols):
        if j % blocksize == 0:
            saliency = w[:, j:] ** 2 / own[j:]  # w^2 / [H_F^-1]_jj
            for r in range(rows):
                remaining = target - int(pruned[r, :j].sum())
                chosen = saliency[r].argsort()[:remaining]
                chosen = chosen[chosen < blocksize]
                pruned[r, j + chosen] = True
        inverse = torch.linalg.inv(h[j:, j:])
        s = scales[:, 0].double()
        q = torch.where(pruned[:, j], 0.0, torch.clamp(torch.round(w[:, j] / s), low, high) * s)
        w[:, j:] -= ((w[:, j] - q) / inverse[0, 0]).unsqueeze(1) * inverse[0].unsqueeze(0)
        w[:, j] = q
    return w.float(), ~pruned


@pytest.mark.parametrize("blocksize", [3, 8])
def test_joint_sparsegpt_gptq_matches_naive_obs_reference(blocksize):
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(4, 8, generator=g)
    stats = LayerStats(8)
    stats.add(torch.randn(64, 8, generator=g) @ (torch.eye(8) + 0.5 * torch.randn(8, 8, generator=g)))
    prune = PruneStage(method="sparsegpt", sparsity=0.5, blocksize=blocksize)
    quant = QuantizeStage(method="gptq", bits=4, act_order=False)
    result = compress_weight(weight, stats, prune, quant=quant)
    expected_scales = weight.abs().amax(dim=1, keepdim=True) / 7
    assert torch.allclose(result.scales, expected_scales)
    reference, keep = _naive_joint_reference(weight, stats.hessian, result.scales, 4, 4, blocksize)
    assert torch.equal(result.mask, keep)
    assert torch.all(result.weight[~keep] == 0)
    assert torch.allclose(result.weight, reference, atol=1e-5, rtol=0)


def test_gptq_needs_statistics():
    with pytest.raises(ValueError, match="gptq needs calibration"):
        compress_weight(torch.randn(2, 8), None, quant=QuantizeStage(method="gptq"))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.sampled_from([4, 8]), st.integers(0, 10_000))
def test_embedding_rows_round_trip_within_half_a_step(vocab, dim, bits, seed):
    table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed))
    table[-1] = 0.0
    q, scales = quantize_rows(table, bits)
    low, high = RANGES[bits]
    assert q.dtype == torch.int8 and q.shape == (vocab, dim) and int(q.min()) >= low and int(q.max()) <= high
    assert scales.dtype == torch.float32 and scales.shape == (vocab,) and torch.all(scales > 0)
    back = dequantize_rows(q, scales)
    assert torch.all((back - table).abs() <= scales.unsqueeze(1) / 2 + 1e-6)
    assert torch.all(back[-1] == 0)
    assert torch.allclose(scales[:-1], table[:-1].abs().amax(dim=1) / high)
