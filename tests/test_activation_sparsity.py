"""Activation sparsity: thresholds calibrated per layer, switched at run time, saved and loaded, native == reference."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress.calibration import make_batches
from sparsepress.kernels import packed_linear, reference_linear
from sparsepress.nn import SparseLinear
from sparsepress.nn.activation import activation_levels, active_threshold, sparsify_inputs
from sparsepress.runtime import disable_native_blocks, use_native_blocks

RECIPE = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                     {"activation_sparsity": {"sparsity": 0.4}}]}


def _compressed():
    return sp.compress(tiny_bert(), RECIPE, calibration=token_ids(8, length=16))


def _zero_fraction_per_layer(model, level: float) -> dict[str, float]:
    sp.set_activation_sparsity(model, level)
    fractions: dict[str, list[float]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear) and module.act_thresholds is not None:
            def hook(m, args, _name=name):
                x = args[0]
                t = active_threshold(m)
                fractions.setdefault(_name, []).append(float((x.abs() < t).float().mean()))
            handles.append(module.register_forward_pre_hook(hook))
    batch = make_batches(token_ids(8, length=16), 8, 0)[0]
    with torch.no_grad():
        model(**batch)
    for handle in handles:
        handle.remove()
    return {name: sum(v) / len(v) for name, v in fractions.items()}


def test_thresholds_zero_the_asked_fraction_on_calibration_data():
    model = _compressed()
    assert activation_levels(model) == [0.0, 0.25, 0.4, 0.5, 0.6]
    for level in (0.25, 0.5):
        fractions = _zero_fraction_per_layer(model, level)
        assert len(fractions) == 12  # every Linear of both blocks
        for name, fraction in fractions.items():
            assert abs(fraction - level) < 0.08, (name, fraction)


def test_switching_changes_outputs_and_zero_turns_it_off():
    model = _compressed()
    batch = make_batches(token_ids(2, length=16), 2, 0)[0]
    with torch.no_grad():
        sparse = model(**batch).last_hidden_state
        sp.set_activation_sparsity(model, 0)
        off = model(**batch).last_hidden_state
        for module in model.modules():  # the same model without any thresholds
            if isinstance(module, SparseLinear):
                module.act_thresholds = None
        # the native Stack's plan watched the thresholds, so this call would fall back to the modules:
        # rebuild it, so that both calls run the same path (the one users get)
        native = disable_native_blocks(model)
        if native:
            assert use_native_blocks(model)
        plain = model(**batch).last_hidden_state
    assert torch.equal(off, plain)
    assert not torch.allclose(sparse, off)


def test_unknown_level_names_the_stored_ones():
    model = _compressed()
    with pytest.raises(ValueError, match="stored levels: 0, 0.25, 0.4, 0.5, 0.6"):
        sp.set_activation_sparsity(model, 0.3)
    with pytest.raises(ValueError, match="no activation-sparsity thresholds"):
        sp.set_activation_sparsity(tiny_bert(), 0.4)


def test_a_call_keeps_the_level_it_started_with():
    model = _compressed()
    first, second = model.encoder.layer[0].attention.self.query, model.encoder.layer[1].output.dense
    seen = []
    switch = first.register_forward_pre_hook(lambda m, a: sp.set_activation_sparsity(model, 0.6))
    record = second.register_forward_pre_hook(lambda m, a: seen.append(active_threshold(m)))
    batch = make_batches(token_ids(1, length=8), 1, 0)[0]
    with torch.no_grad():
        model(**batch)  # switched to 0.6 mid-call: this call still runs at 0.4
        switch.remove()
        model(**batch)  # the next call sees 0.6
    record.remove()
    ladder = activation_levels(model)[1:]
    assert seen == [float(second.act_thresholds[ladder.index(0.4)]), float(second.act_thresholds[ladder.index(0.6)])]


def test_save_and_load_keep_thresholds_and_the_default_level(tmp_path):
    model = _compressed()
    sp.set_activation_sparsity(model, 0.6)  # a switch is runtime state: the folder keeps the recipe's level
    out = sp.save(model, tmp_path / "m")
    loaded = sp.load(out)
    assert activation_levels(loaded) == activation_levels(model)
    batch = make_batches(token_ids(2, length=16), 2, 0)[0]
    sp.set_activation_sparsity(model, 0.4)
    with torch.no_grad():
        assert torch.allclose(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-5)
    layer = loaded.encoder.layer[0].intermediate.dense
    assert active_threshold(layer) == float(layer.act_thresholds[1])  # opened at 0.4, the recipe's level


@pytest.mark.parametrize("fmt, dtype", [("dense", "int8"), ("dense", "fp32"), ("bitmask", "int8"), ("bitmask", "fp32"),
                                        ("bitmask", "int4"), ("nm", "int8"), ("bbs", "int8"), ("csr", "int8")])
def test_native_equals_reference_on_sparsified_inputs(fmt, dtype):
    torch.manual_seed(1)
    weight = torch.randn(48, 128)
    weight[:, 1::2] = 0.0  # fits bitmask, 2:4 (two of each four kept) and bbs
    linear = torch.nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight.copy_(weight)
    params = {"bank": 64} if fmt == "bbs" else {}
    layer = SparseLinear.from_linear(linear, format=fmt, dtype=dtype, **params)
    for rows in (1, 3, 16):
        x = sparsify_inputs(torch.randn(rows, 128), 0.8)  # ~58% of the inputs zeroed
        y = packed_linear(x, layer.packed, layer.bias)
        ref = reference_linear(x, layer.packed, layer.bias)
        assert torch.allclose(y, ref, atol=1e-4, rtol=1e-4), (fmt, dtype, rows)


def test_recipe_levels_are_validated():
    with pytest.raises(sp.RecipeError, match="activation sparsity level"):
        sp.Recipe.from_yaml_text("stages:\n  - activation_sparsity: {sparsity: 0.4, levels: [1.5]}\n")
