"""Activation sparsity in the native kernels: column skipping (csrc/colskip.h) against the reference on
every weight kind and ISA tree, the policy that picks the path, and the native Stack / decoder applying
each layer's threshold at the level a call runs at."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress import native
from sparsepress.formats import DenseWeight
from sparsepress.kernels import native_handle, packed_linear, reference_linear
from sparsepress.nn import SparseLinear
from sparsepress.nn.activation import sparsify_inputs
from sparsepress.runtime import NativeDecoder, generate, native_blocks_of, use_native_blocks

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.native_available(), reason="native extension not built")]

NEVER, ALWAYS = 1, 2


@pytest.fixture()
def policy():
    """Set the column-skip policy for one test; the measured default comes back afterwards."""
    lib = native.module()
    yield lib.set_colskip_policy
    lib.set_colskip_policy(0)


@pytest.fixture()
def every_tree():
    isa = native.active_isa()
    yield native.supported_isas()
    native.set_isa(isa)


def _weights(out: int, inn: int, density: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inn, generator=gen)
    return w * (torch.rand(out, inn, generator=gen) < density)


def _layers() -> dict[str, SparseLinear]:
    """Int8 layers of every packing the column chunks take: dense, sparse masked chunks (<= 75% stored),
    dense chunks of a masked weight (> 75% stored), N:M, BBS, per-group scales; odd sizes."""
    layers = {}
    for name, (density, fmt, params) in {
        "dense": (1.0, "dense", {}), "bitmask-30%": (0.3, "bitmask", {}), "bitmask-90%": (0.9, "bitmask", {}),
        "nm": (None, "nm", {}), "bbs": (None, "bbs", {"bank": 64}), "grouped": (1.0, "dense", {"group_size": 32}),
    }.items():
        w = _weights(70, 192, density or 1.0, seed=len(name))
        if density is None:
            w[:, 1::2] = 0.0  # 2:4 and bank-balanced alike
        linear = torch.nn.Linear(192, 70)
        with torch.no_grad():
            linear.weight.copy_(w)
        layers[name] = SparseLinear.from_linear(linear, format=fmt, dtype="int8", **params)
    return layers


@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9])
def test_column_skipping_equals_the_reference_on_every_tree(rows, policy, every_tree):
    x = torch.randn(rows, 192, generator=torch.Generator().manual_seed(rows))
    threshold = 0.9  # ~63% of the inputs zeroed; tokens share few columns
    for tree in every_tree:
        native.set_isa(tree)
        for name, layer in _layers().items():
            handle = native_handle(layer.packed)
            if handle is None:
                continue
            ref = reference_linear(sparsify_inputs(x, threshold), layer.packed, layer.bias)
            for mode in (NEVER, ALWAYS):
                policy(mode)
                y = packed_linear(x, layer.packed, layer.bias, threshold=threshold)
                assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (tree, name, rows, mode)
                skipped = handle.last_skipped
                assert skipped == (mode == ALWAYS and rows <= native.module().colskip_max_batch), (tree, name, rows)


def test_column_chunks_follow_the_stored_share(policy):
    policy(ALWAYS)  # these layers are below the size the measured policy gives chunks to
    layers = _layers()
    for name, sparse in (("dense", False), ("bitmask-30%", True), ("bitmask-90%", False)):
        handle = native_handle(layers[name].packed)
        assert handle.prepare_colpanels(1)
        assert handle.colpanels_sparse == sparse, name
        assert handle.colpanel_bytes > 0


def test_the_measured_policy_leaves_small_layers_without_chunks(policy):
    layer = _layers()["dense"]
    policy(0)
    x = sparsify_inputs(torch.randn(1, 192), 1.5)  # ~87% zeros: skipping would be chosen on a big layer
    y = packed_linear(x, layer.packed, layer.bias, threshold=1.5)
    handle = native_handle(layer.packed)
    assert not handle.last_skipped and handle.colpanel_bytes == 0
    assert torch.allclose(y, reference_linear(x, layer.packed, layer.bias), atol=1e-4, rtol=1e-4)


def test_the_measured_policy_skips_by_the_share_of_listed_columns(policy):
    """A big layer: inputs without zeros take the row kernels, 90% zeros skip columns on the x86 SIMD
    trees (whose measured densities allow it at one token); both equal the reference."""
    packed = DenseWeight.pack(_weights(2048, 4096, 1.0, 5), dtype="int8")
    handle = native_handle(packed)
    policy(0)
    full = torch.randn(1, 4096).sign() * 2.0  # every |x| = 2 > threshold
    mostly_zero = full * (torch.rand(1, 4096, generator=torch.Generator().manual_seed(0)) < 0.1)
    for x, skips in ((full, False), (mostly_zero, native.active_isa() in ("amx", "avx512", "avx2", "avx2vnni"))):
        y = packed_linear(x, packed, threshold=0.5)
        assert handle.last_skipped == skips
        assert torch.allclose(y, reference_linear(x, packed, None), atol=1e-3, rtol=1e-4)


def test_threshold_on_a_non_native_call_zeroes_inputs_in_torch():
    packed = DenseWeight.pack(_weights(8, 16, 1.0, 3), dtype="int8")
    x = torch.randn(2, 16, dtype=torch.float64)
    y = packed_linear(x, packed, threshold=0.7)
    ref = reference_linear(sparsify_inputs(x, 0.7), packed, None)
    assert torch.allclose(y, ref.to(y.dtype), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(y, reference_linear(x, packed, None).to(y.dtype), atol=1e-4)


RECIPE = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                     {"activation_sparsity": {"sparsity": 0.4}}]}


def _reference_and_native(model, inputs):
    forward = native_blocks_of(model)
    assert forward is not None
    with torch.inference_mode():
        forward.enabled = False
        reference = model(**inputs)
        forward.enabled = True
        before = forward.native_calls
        fast = model(**inputs)
    return reference, fast, forward.native_calls - before


def test_native_stack_applies_the_thresholds_of_the_level_in_force(policy):
    model = sp.compress(tiny_bert(), RECIPE, calibration=token_ids(8, length=16))
    assert native_blocks_of(model) is not None or use_native_blocks(model)
    ids = torch.stack(token_ids(2, length=6))  # 12 tokens: the row kernels on zeroed inputs
    single = ids[:1]  # 6 tokens: column skipping where it pays
    for mode in (0, ALWAYS):
        policy(mode)
        for level in (0.0, 0.4, 0.6):
            sp.set_activation_sparsity(model, level)
            for batch in (ids, single):
                reference, fast, calls = _reference_and_native(model, {"input_ids": batch})
                assert calls == 1, "activation sparsity runs on the native stack"
                a, b = reference.last_hidden_state, fast.last_hidden_state
                assert float((a - b).norm()) <= 1e-4 * float(a.norm()), (mode, level)
    sp.set_activation_sparsity(model, 0.0)
    off = model(input_ids=single).last_hidden_state
    sp.set_activation_sparsity(model, 0.6)
    assert not torch.allclose(off, model(input_ids=single).last_hidden_state), "the level changes the result"


def _tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)
    calibration = [torch.randint(3, 100, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return sp.compress(T.LlamaForCausalLM(config).eval(), RECIPE, calibration=calibration)


def test_native_decoder_applies_activation_sparsity_like_the_module_path(policy):
    model = _tiny_llama()
    ids = torch.randint(3, 100, (1, 5), generator=torch.Generator().manual_seed(2))
    policy(ALWAYS)
    outputs = {}
    for level in (0.0, 0.6):
        sp.set_activation_sparsity(model, level)
        ours = generate(model, ids, max_new_tokens=6)
        with torch.inference_mode():
            theirs = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
        assert ours.tolist() == theirs.tolist(), level
        assert torch.allclose(NativeDecoder(model).scores(ids), logits, atol=1e-4, rtol=1e-4), level
        outputs[level] = logits
    assert not torch.allclose(outputs[0.0], outputs[0.6])
