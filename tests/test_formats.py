"""Every packed format round-trips exactly (hypothesis), rejects weights that do not fit, and
rejects damaged tensors with LayoutMismatch."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsepress.formats import FORMATS, BBSWeight, BitmaskWeight, CSRWeight, DenseWeight, LayoutMismatch, NMWeight
from sparsepress.formats import values as V

DTYPES = ["fp32", "bf16", "int8", "int4"]


def _grid_weight(rows: int, cols: int, dtype: str, keep: torch.Tensor, seed: int, group_size: int | None):
    """A weight already on the grid of `dtype`, so packing must be exact."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * keep
    if dtype == "bf16":
        return weight.to(torch.bfloat16).float(), None
    if dtype == "fp32":
        return weight, None
    grid, scales = V.quantize_dense(weight, dtype, None, group_size)
    return V.dequantize_dense(grid, scales, dtype, group_size), scales


def _roundtrip(cls, weight, dtype, scales, group_size, **params):
    packed = cls.pack(weight, dtype=dtype, scales=scales, group_size=group_size, **params)
    assert torch.equal(packed.unpack(), weight)
    rebuilt = cls.from_tensors({k: v.clone() for k, v in packed.tensors().items()}, packed.meta())
    assert torch.equal(rebuilt.unpack(), weight)
    for name, tensor in packed.tensors().items():
        assert torch.equal(rebuilt.tensors()[name], tensor), name
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in packed.tensors().values())
    return packed


shapes = st.tuples(st.integers(1, 9), st.integers(1, 5))
groups = st.sampled_from([None, 8, 16])


@settings(max_examples=60, deadline=None)
@given(shapes, st.sampled_from(DTYPES), st.floats(0.0, 0.99), st.integers(0, 2**16), groups)
def test_bitmask_dense_csr_roundtrip(shape, dtype, sparsity, seed, group_size):
    rows, cols = shape[0], shape[1] * 7
    keep = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed)) >= sparsity
    weight, scales = _grid_weight(rows, cols, dtype, keep, seed, group_size)
    for cls in (DenseWeight, BitmaskWeight, CSRWeight):
        _roundtrip(cls, weight, dtype, scales, group_size)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.sampled_from([(1, 2), (2, 4), (1, 4), (4, 8), (3, 8), (2, 8)]), st.integers(1, 4),
       st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_nm_roundtrip(rows, nm, groups_per_row, dtype, seed):
    n, m = nm
    cols = m * groups_per_row
    scores = torch.rand(rows, cols // m, m, generator=torch.Generator().manual_seed(seed))
    top = scores.topk(n, dim=2).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(2, top, True).view(rows, cols)
    weight, scales = _grid_weight(rows, cols, dtype, keep, seed, None)
    packed = _roundtrip(NMWeight, weight, dtype, scales, None, n=n, m=m)
    assert packed.values.numel() == (rows * cols * n // m if dtype != "int4" else -(-rows * cols * n // m // 2))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.sampled_from([4, 8, 16]), st.integers(1, 3), st.integers(1, 16),
       st.sampled_from(DTYPES), st.integers(0, 2**16))
def test_bbs_roundtrip(rows, bank, banks, k, dtype, seed):
    k = min(k, bank)
    cols = bank * banks
    scores = torch.rand(rows, banks, bank, generator=torch.Generator().manual_seed(seed))
    top = scores.topk(k, dim=2).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter(2, top, True).view(rows, cols)
    weight, scales = _grid_weight(rows, cols, dtype, keep, seed, None)
    packed = _roundtrip(BBSWeight, weight, dtype, scales, None, bank=bank)
    assert packed.k <= k


def test_nm_rejects_weight_that_is_not_nm():
    with pytest.raises(ValueError, match="not 2:4"):
        NMWeight.pack(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), n=2, m=4)
    with pytest.raises(ValueError, match="multiple of M"):
        NMWeight.pack(torch.ones(1, 6), n=2, m=4)


def test_bbs_rejects_unbalanced_count_and_bad_bank():
    with pytest.raises(ValueError, match="more than k"):
        BBSWeight.pack(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), bank=4, k=2)
    with pytest.raises(ValueError, match="multiple of the bbs bank"):
        BBSWeight.pack(torch.ones(1, 6), bank=4)


def test_int8_grid_respects_given_scales():
    scales = torch.tensor([[0.5], [0.25]])
    weight = torch.tensor([[1.0, -63.5], [0.25, 0.0]])
    packed = BitmaskWeight.pack(weight, dtype="int8", scales=scales)
    assert packed.values.tolist() == [2, -127, 1]
    assert torch.equal(packed.unpack(), weight)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_damaged_tensors_are_refused(name):
    cls = FORMATS[name]
    params = {"n": 2, "m": 4} if name == "nm" else ({"bank": 4} if name == "bbs" else {})
    weight = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]] * 3)
    packed = cls.pack(weight, dtype="int8", **params)
    tensors = packed.tensors()
    for victim in tensors:
        broken = dict(tensors)
        broken[victim] = tensors[victim].flatten()[:-1].clone()
        with pytest.raises(LayoutMismatch):
            cls.from_tensors(broken, packed.meta())
        wrong_dtype = dict(tensors)
        wrong_dtype[victim] = tensors[victim].to(torch.float64)
        with pytest.raises(LayoutMismatch):
            cls.from_tensors(wrong_dtype, packed.meta())
    missing = dict(tensors)
    missing.pop(cls.tensor_names[0])
    with pytest.raises(LayoutMismatch, match="missing"):
        cls.from_tensors(missing, packed.meta())


def test_sizes_follow_bytes_per_weight():
    torch.manual_seed(0)
    weight = torch.randn(64, 256)
    weight[torch.rand_like(weight) < 0.5] = 0
    bitmask = BitmaskWeight.pack(weight, dtype="int8")
    dense = DenseWeight.pack(weight, dtype="int8")
    per_weight = (bitmask.nbytes - bitmask.scales.numel() * 4) / weight.numel()
    assert abs(per_weight - (0.125 + bitmask.nnz / weight.numel())) < 1e-9
    assert bitmask.nbytes < 0.7 * dense.nbytes
