"""Gather rows (csrc/gather_rows.h): very sparse int8 weights run per stored value at few tokens.

The layout is built when a weight is packed for a tree with a gather kernel (scalar and AVX2: records of
eight; AVX-512 and AMX: 256-column windows); every such tree's output equals the reference on masks of any
shape (hypothesis), gaps wider than one record's 255-column reach, empty rows and windows holding more
than 64 values included; denser weights, many tokens and the trees without the kernel keep the mask
stream alone, and a weight laid out for one tree still runs right under another.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsepress import native
from sparsepress.formats import BitmaskWeight
from sparsepress.kernels import native_handle, packed_linear, reference_linear

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.native_available(), reason="native extension not built")]

GATHER_TREES = [isa for isa in ("scalar", "avx2", "avx2vnni", "avx512", "amx") if isa in native.supported_isas()]


@pytest.fixture()
def restore_isa():
    isa = native.active_isa()
    yield
    native.set_isa(isa)


def _very_sparse(out: int, inn: int, density: float, gap: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen) * (torch.rand(out, inn, generator=gen) < density)
    w[:, gap[0]:gap[1]] = 0.0  # a stretch no record reaches in one step when wider than 255
    if out > 2:
        w[1] = 0.0  # an empty row
    return w


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 9), inn=st.integers(1, 1500), density=st.sampled_from([0.002, 0.02, 0.1, 0.2, 0.3]),
       gap=st.tuples(st.integers(0, 1500), st.integers(0, 700)), batch=st.integers(1, 3), seed=st.integers(0, 99))
def test_gather_rows_equal_the_reference_on_every_tree(out, inn, density, gap, batch, seed):
    w = _very_sparse(out, inn, density, (gap[0], gap[0] + gap[1]), seed)
    x = torch.randn(batch, inn, generator=torch.Generator().manual_seed(seed + 1))
    isa = native.active_isa()
    try:
        for tree in GATHER_TREES:
            native.set_isa(tree)
            packed = BitmaskWeight.pack(w, dtype="int8")  # packed under this tree: gather rows where sparse enough
            sparse_enough = int(packed.values.numel()) <= native.module().gather_max_density() * out * inn  # as C++ reads it
            assert (native_handle(packed).gather_bytes > 0) == sparse_enough, tree
            y = packed_linear(x, packed, None)
            ref = reference_linear(x, packed, None)
            assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (tree, (y - ref).abs().max())
    finally:
        native.set_isa(isa)


@pytest.mark.parametrize("tree", GATHER_TREES)
def test_only_very_sparse_weights_get_gather_rows(tree, restore_isa):
    native.set_isa(tree)
    dense_enough = BitmaskWeight.pack(_very_sparse(16, 512, 0.5, (0, 0), 0), dtype="int8")
    very_sparse = BitmaskWeight.pack(_very_sparse(16, 512, 0.1, (0, 0), 0), dtype="int8")
    assert native_handle(dense_enough).gather_bytes == 0
    # at 90% the records take no more bytes than the mask stream they copy (2 per value + row offsets)
    stored = int(very_sparse.values.numel())
    assert 0 < native_handle(very_sparse).gather_bytes <= 2.25 * stored + 8 * 17 + 16 * 17


@pytest.mark.parametrize("tree", [isa for isa in native.supported_isas() if isa not in GATHER_TREES])
def test_trees_without_a_gather_kernel_keep_the_mask_stream_alone(tree, restore_isa):
    native.set_isa(tree)
    packed = BitmaskWeight.pack(_very_sparse(16, 512, 0.1, (0, 0), 0), dtype="int8")
    assert native_handle(packed).gather_bytes == 0


@pytest.mark.parametrize("tree", GATHER_TREES)
def test_many_tokens_of_a_gather_weight_take_the_other_kernels(tree, restore_isa):
    """Past the tree's few-token limit the mask stream (row kernels, GEMM) serves the same weight."""
    native.set_isa(tree)
    w = _very_sparse(70, 640, 0.1, (100, 400), 3)
    packed = BitmaskWeight.pack(w, dtype="int8")
    for batch in (1, 4, 17, 40):
        x = torch.randn(batch, 640, generator=torch.Generator().manual_seed(batch))
        assert torch.allclose(packed_linear(x, packed, None), reference_linear(x, packed, None), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tree", GATHER_TREES)
def test_clustered_rows_with_full_windows_equal_the_reference(tree, restore_isa):
    """A sparse weight whose rows keep whole stretches: windows of more than 64 (up to all 256) values."""
    native.set_isa(tree)
    gen = torch.Generator().manual_seed(7)
    w = torch.zeros(9, 3000)
    w[:, 512:768] = torch.randn(9, 256, generator=gen)  # one window kept whole
    w[:3, 1000:1090] = torch.randn(3, 90, generator=gen)  # 90 values in one window
    w[5, 2990:] = torch.randn(10, generator=gen)  # the last, partial window
    packed = BitmaskWeight.pack(w, dtype="int8")
    assert native_handle(packed).gather_bytes > 0
    for batch in (1, 2, 3):
        x = torch.randn(batch, 3000, generator=torch.Generator().manual_seed(batch))
        assert torch.allclose(packed_linear(x, packed, None), reference_linear(x, packed, None), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(len(GATHER_TREES) < 2, reason="needs two trees with gather kernels")
def test_a_weight_laid_out_for_one_tree_runs_right_under_another(restore_isa):
    w = _very_sparse(33, 1500, 0.05, (200, 500), 5)
    x = torch.randn(1, 1500, generator=torch.Generator().manual_seed(2))
    for packed_on in GATHER_TREES:
        native.set_isa(packed_on)
        packed = BitmaskWeight.pack(w, dtype="int8")
        handle = native_handle(packed)
        assert handle.gather_bytes > 0
        for run_on in GATHER_TREES:
            native.set_isa(run_on)
            assert torch.allclose(packed_linear(x, packed, None), reference_linear(x, packed, None),
                                  atol=1e-4, rtol=1e-4), (packed_on, run_on)
