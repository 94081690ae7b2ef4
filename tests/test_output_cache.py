"""Recycled output memory (csrc/output_cache.h, native.output_tensor): reuse without aliasing."""

from __future__ import annotations

import gc

import pytest
import torch

from sparsepress import native

pytestmark = pytest.mark.native
needs_native = pytest.mark.skipif(not native.native_available(), reason="sparsepress._native not built")

BIG = (1024, 384)  # 1.5 MiB: above the recycling threshold


@pytest.fixture
def empty_cache():
    native.release_cached_outputs()
    yield
    native.release_cached_outputs()


def test_small_outputs_are_plain_tensors():
    out = native.output_tensor(3, 5)
    assert out.shape == (3, 5) and out.dtype == torch.float32 and out.is_contiguous()


@needs_native
def test_a_dead_output_is_handed_out_again(empty_cache):
    first = native.output_tensor(*BIG)
    address = first.data_ptr()
    assert first.shape == BIG and first.dtype == torch.float32 and address % 64 == 0
    del first
    gc.collect()
    assert native.module().cached_output_bytes() >= 1024 * 384 * 4
    again = native.output_tensor(*BIG)
    assert again.data_ptr() == address
    assert native.module().cached_output_bytes() == 0


@needs_native
def test_live_outputs_and_their_views_never_share_memory(empty_cache):
    first = native.output_tensor(*BIG)
    view = first.view(-1)[1000:]
    del first
    gc.collect()
    assert native.module().cached_output_bytes() == 0  # the view keeps the block alive
    second = native.output_tensor(*BIG)
    view.fill_(1.0)
    second.fill_(2.0)
    assert bool((view == 1.0).all()) and bool((second == 2.0).all())
    assert second.data_ptr() != view.data_ptr() - 1000 * 4


@needs_native
def test_sizes_far_from_the_request_are_not_reused(empty_cache):
    big = native.output_tensor(4096, 384)
    address = big.data_ptr()
    del big
    gc.collect()
    small = native.output_tensor(*BIG)  # a quarter of the free block: allocating beats pinning it
    assert small.data_ptr() != address


@needs_native
def test_the_cache_stays_bounded_and_can_be_emptied(empty_cache):
    blocks = [native.output_tensor(8 << 20) for _ in range(40)]  # 40 x 32 MiB
    del blocks
    gc.collect()
    held = native.module().cached_output_bytes()
    assert 0 < held <= 256 << 20
    assert native.release_cached_outputs() == held
    assert native.module().cached_output_bytes() == 0


@needs_native
def test_outputs_survive_across_threads(empty_cache):
    import threading

    made: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: made.append(native.output_tensor(*BIG).fill_(3.0)))
    worker.start()
    worker.join()
    assert bool((made[0] == 3.0).all())
    del made[:]
    gc.collect()
    assert native.module().cached_output_bytes() >= 1024 * 384 * 4


@needs_native
def test_layer_outputs_in_recycled_memory_never_alias(empty_cache):
    """Two live outputs of the same layer stay distinct; a freed one comes back for the next call."""
    from sparsepress import kernels
    from sparsepress.formats import BitmaskWeight

    torch.manual_seed(0)
    weight = torch.randn(512, 256) * (torch.rand(512, 256) < 0.5)
    packed = BitmaskWeight.pack(weight, dtype="int8")
    x1, x2 = torch.randn(300, 256), torch.randn(300, 256)  # 300 x 512 floats: a recycled block
    y1 = kernels.packed_linear(x1, packed)
    kept = y1.clone()
    y2 = kernels.packed_linear(x2, packed)
    assert y1.data_ptr() != y2.data_ptr()
    assert torch.equal(y1, kept)
    torch.testing.assert_close(y2, kernels.reference_linear(x2, packed, None), atol=1e-4, rtol=1e-4)
    address = y1.data_ptr()
    del y1
    gc.collect()
    y3 = kernels.packed_linear(x1, packed)
    assert y3.data_ptr() == address and torch.equal(y3, kept)
