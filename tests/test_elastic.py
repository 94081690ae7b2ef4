"""Nested elastic sparsity levels: nesting for every base format and dtype, storage round trips, native ==
reference on every ISA, switching (equal to single-level models packed from the same weights, thread-safe),
compression with every method, save / load at a level."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from switching_helpers import calls_while_switching
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress.calibration import make_batches
from sparsepress.formats import BitmaskWeight, ElasticWeight, LayoutMismatch
from sparsepress.formats.elastic import BASE_FORMATS, code_width
from sparsepress.kernels import elastic_linear, elastic_native_plan, reference_elastic_linear
from sparsepress.models import replace_module
from sparsepress.nn import ElasticLinear, SparseLinear
from sparsepress.nn.elastic import current_sparsity, sparsity_levels

LEVELS = [0.5, 0.7, 0.9]
DTYPES = ("fp32", "bf16", "int8", "int4")


def _nested(rows: int, cols: int, levels: list[float], seed: int = 0, group: int | None = None,
            base: str = "bitmask") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A weight and nested keep-masks that fit `base` (bbs: per bank of 8, nm: 2:4 at the lowest level)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen)
    score = weight.abs() + 0.01 * torch.rand(rows, cols, generator=gen)
    keeps = []
    for level in levels:
        if base in ("bbs", "nm") and not keeps:  # only the lowest level must fit the base format
            width = 8 if base == "bbs" else 4
            banks = score.view(rows, -1, width)
            count = 4 if base == "bbs" else 2
            top = banks.topk(count, dim=2).indices
            keep = torch.zeros_like(banks, dtype=torch.bool).scatter_(2, top, True).view(rows, cols)
        else:
            keep = score >= score.flatten().kthvalue(max(1, int(level * score.numel()))).values
        keeps.append(keep & keeps[-1] if keeps else keep)
    return weight * keeps[0], keeps


def _pack(dtype: str, base: str = "bitmask", rows: int = 24, cols: int = 64, group: int | None = None,
          shifts: bool = False, seed: int = 0) -> ElasticWeight:
    weight, keeps = _nested(rows, cols, LEVELS, seed, base=base)
    params = {"bank": 8} if base == "bbs" else {"n": 2, "m": 4} if base == "nm" else {}
    gains = 0.5 + torch.rand(len(LEVELS), rows, generator=torch.Generator().manual_seed(seed)) if dtype.startswith("int") else None
    return ElasticWeight.pack(weight, dtype=dtype, group_size=group, keeps=keeps, levels=LEVELS, base=base,
                              gains=gains, shifts=torch.randn(len(LEVELS), rows) if shifts else None, **params)


@pytest.mark.parametrize("base", sorted(BASE_FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_levels_nest_and_round_trip_for_every_base_and_dtype(base, dtype):
    packed = _pack(dtype, base)
    masks = [packed.level_mask(i) for i in range(len(LEVELS))]
    for lower, higher in zip(masks, masks[1:]):
        assert bool((higher <= lower).all()), "a higher level keeps a weight a lower one prunes"
        assert int(higher.sum()) < int(lower.sum())
    for i, mask in enumerate(masks):
        assert bool((packed.unpack(i)[~mask] == 0).all())
        assert bool((packed.unpack(i)[mask] != 0).all())
    stored = packed.tensors()
    assert stored["level_codes"].numel() == -(-int(masks[0].sum()) * code_width(len(LEVELS)) // 8)
    again = ElasticWeight.from_tensors(stored, packed.meta())
    for i in range(len(LEVELS)):
        assert torch.equal(again.unpack(i), packed.unpack(i))
        assert torch.equal(again.level_mask(i), masks[i])
    assert again.base == base and again.levels == tuple(LEVELS)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), n_levels=st.integers(1, 4),
       dtype=st.sampled_from(DTYPES), group=st.sampled_from([None, 16]), seed=st.integers(0, 10_000))
def test_elastic_pack_unpack_round_trip(rows, cols, n_levels, dtype, group, seed):
    if group is not None and not dtype.startswith("int"):
        group = None
    levels = [round(0.1 + 0.2 * i, 2) for i in range(n_levels)]
    weight, keeps = _nested(rows, cols, levels, seed)
    packed = ElasticWeight.pack(weight, dtype=dtype, group_size=group, keeps=keeps, levels=levels)
    again = ElasticWeight.from_tensors(packed.tensors(), packed.meta())
    for i in range(n_levels):
        assert torch.equal(again.dense_grid(i), packed.dense_grid(i))
        assert bool((packed.level_mask(i) <= keeps[i]).all())  # kept = non-zero after quantization
    if dtype == "fp32":
        assert torch.equal(packed.unpack(0), weight)


def test_pack_refuses_levels_that_do_not_nest():
    weight = torch.tensor([[1.0, 0.0]])
    with pytest.raises(ValueError, match="nest"):
        ElasticWeight.pack(weight, keeps=[torch.tensor([[True, False]]), torch.tensor([[False, True]])],
                           levels=[0.5, 0.9], base="bitmask")
    with pytest.raises(ValueError, match="increasing"):
        ElasticWeight.pack(weight, keeps=[weight != 0, weight != 0], levels=[0.5, 0.5])


def test_damaged_codes_are_refused():
    packed = _pack("int8")
    stored = dict(packed.tensors())
    stored["level_codes"] = stored["level_codes"][:-1]
    with pytest.raises(LayoutMismatch, match="level_codes"):
        ElasticWeight.from_tensors(stored, packed.meta())
    stored = dict(packed.tensors())
    stored["level_gains"] = -stored["level_gains"]
    with pytest.raises(LayoutMismatch, match="level_gains"):
        ElasticWeight.from_tensors(stored, packed.meta())


@pytest.mark.native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 32])
def test_native_matches_reference_at_every_level(isa, dtype, group):
    if group is not None and not dtype.startswith("int"):
        pytest.skip("float values have no scale groups")
    packed = _pack(dtype, rows=40, cols=100 if group is None else 96, group=group)
    bias = torch.randn(40)
    for level in range(len(LEVELS)):
        for rows in (1, 3, 40):
            x = torch.randn(rows, packed.shape[1])
            ref = reference_elastic_linear(x, packed, level, bias)
            got = elastic_linear(x, packed, level, bias)
            tolerance = 2e-2 if dtype == "bf16" else 1e-4
            assert float((got - ref).abs().max()) <= tolerance * float(ref.abs().max()), (isa, level, rows)


@pytest.mark.native
@pytest.mark.parametrize("dtype", ["int8", "fp32"])
def test_native_levels_at_every_token_count_and_switching_keeps_the_panels(isa, dtype):
    """Segment-major levels (csrc/elastic.h): each level's sum of segments equals the reference at 1..70
    tokens (row kernels and GEMM, with a fused activation); at 16 tokens the segments' GEMM panels are
    built on the first pass over the levels and then serve every level: switching rebuilds nothing."""
    packed = _pack(dtype, rows=72, cols=160, seed=3)
    bias = torch.randn(72)
    handle = elastic_native_plan(packed)
    gen = torch.Generator().manual_seed(7)

    def check(level: int, tokens: int, activation: str | None = None) -> None:
        x = torch.randn(tokens, packed.shape[1], generator=gen)
        ref = reference_elastic_linear(x, packed, level, bias)
        if activation == "relu":
            ref = torch.relu(ref)
        got = elastic_linear(x, packed, level, bias, activation=activation)
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), (isa, dtype, level, tokens)

    for level in range(len(LEVELS)):
        for tokens in (1, 3, 16, 70):
            check(level, tokens)
        check(level, 16, "relu")
    first_pass = handle.panel_bytes
    for level in (2, 0, 1, 2, 1, 0, 2):
        check(level, 16)
        assert handle.panel_bytes == first_pass, (isa, level)
    if dtype == "fp32":
        assert first_pass == 0
    else:
        assert first_pass > 0 or isa not in ("amx", "avx512", "avx2", "avx2vnni"), isa  # trees with prepared panels
        assert handle.panel_segments == (len(LEVELS) if first_pass else 0)


def _compressed(method: str = "wanda", bits: int | None = 8, group: int | None = None):
    stages: list[dict] = [{"prune": {"method": method, "sparsity": LEVELS}}]
    if bits is not None:
        stages.append({"quantize": {"method": "rtn" if method != "sparsegpt" else "gptq", "bits": bits,
                                    "group_size": group}})
    return sp.compress(tiny_bert(), {"stages": stages, "solver": {"mask_search": 4}}, calibration=token_ids(8, 16))


@pytest.mark.parametrize("method,bits,group", [("magnitude", 8, None), ("wanda", 4, 16), ("sparsegpt", 8, None),
                                               ("sparsegpt", None, None)])
def test_compression_nests_every_layer_with_every_method(method, bits, group):
    model = _compressed(method, bits, group)
    layers = [m for m in model.modules() if isinstance(m, ElasticLinear)]
    assert len(layers) == 12 and sparsity_levels(model) == LEVELS
    for layer in layers:
        masks = [layer.packed.level_mask(i) for i in range(3)]
        assert all(bool((b <= a).all()) for a, b in zip(masks, masks[1:]))
        for target, mask in zip(LEVELS, masks):
            assert abs((1 - mask.float().mean().item()) - target) < 0.06
    assert current_sparsity(model) == 0.5


def _batch():
    return make_batches(token_ids(4, 12), 4, 0)[0]


def _single_level_twin(model, level: int):
    """The model with each elastic layer replaced by a single-level bitmask layer of that level's weights
    (same integers, the level's gains folded into its scales, the level's bias)."""
    import copy

    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, ElasticLinear):
            packed = module.packed
            scales = packed.scales * packed.gains[level].unsqueeze(1)
            weight = packed.dense_grid(level).float() * scales
            single = BitmaskWeight.pack(weight, dtype=packed.dtype, scales=scales, group_size=packed.group_size)
            layer = SparseLinear(single, module.level_bias(level))
            layer.activation = module.activation
            replace_module(twin, name, layer)
    return twin


def test_switching_equals_single_level_models_packed_from_the_same_weights():
    model = _compressed("sparsegpt", 8)
    batch = _batch()
    for index, level in enumerate(LEVELS):
        sp.set_sparsity(model, level)
        with torch.no_grad():
            got = model(**batch).last_hidden_state
            want = _single_level_twin(model, index)(**batch).last_hidden_state
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), level
    outputs = []
    for level in LEVELS:
        sp.set_sparsity(model, level)
        with torch.no_grad():
            outputs.append(model(**batch).last_hidden_state)
    assert not torch.allclose(outputs[0], outputs[2])


def test_unknown_level_lists_the_stored_ones():
    model = _compressed()
    with pytest.raises(ValueError, match="stored levels: 0.5, 0.7, 0.9"):
        sp.set_sparsity(model, 0.6)
    with pytest.raises(ValueError, match="no elastic sparsity levels"):
        sp.set_sparsity(tiny_bert(), 0.5)


def test_concurrent_calls_each_see_one_level():
    model = _compressed("magnitude", 8)
    batch = _batch()
    expected = []
    for level in LEVELS:
        sp.set_sparsity(model, level)
        with torch.no_grad():
            expected.append(model(**batch).last_hidden_state)
    mixed = calls_while_switching(lambda: model(**batch).last_hidden_state, expected,
                                  switch=lambda: [sp.set_sparsity(model, level) for level in LEVELS], calls=15)
    assert mixed == 0


def test_save_load_at_a_level(tmp_path):
    model = _compressed("sparsegpt", 4, 16)
    folder = sp.save(model, tmp_path / "m")
    batch = _batch()
    for level in LEVELS:
        sp.set_sparsity(model, level)
        loaded = sp.load(folder, sparsity=level)
        assert current_sparsity(loaded) == level
        with torch.no_grad():
            assert torch.allclose(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state, atol=1e-5)
    assert current_sparsity(sp.load(folder)) == 0.5
    with pytest.raises(ValueError, match="stored levels: 0.5, 0.7, 0.9"):
        sp.load(folder, sparsity=0.6)
    resaved = sp.save(sp.load(folder), tmp_path / "again")
    assert (resaved / "sparsepress.safetensors").read_bytes() == (folder / "sparsepress.safetensors").read_bytes()


def test_elastic_storage_is_small():
    """Every level in one folder costs the lowest level plus its level codes and per-row gains."""
    model = _compressed("magnitude", 8)
    for module in model.modules():
        if isinstance(module, ElasticLinear):
            single = BitmaskWeight.pack(module.packed.unpack(0), dtype="int8")
            codes = module.packed.tensors()["level_codes"].numel()
            gains = module.packed.gains.numel() * 4 + (module.packed.shifts.numel() * 4 if module.packed.shifts is not None else 0)
            assert module.packed.nbytes <= single.nbytes + codes + gains
