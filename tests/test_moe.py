"""Mixture-of-experts models: adapters of every supported family, compress / save / load / generate /
export after expert removal, routing statistics, expert removal and merging, per-expert calibration
and allocation, adaptive routing, and the grouped expert kernels against the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_moe import FAMILIES, VOCAB, legacy_mixtral, tiny_moe, token_ids

import sparsepress as sp
from sparsepress import native
from sparsepress.calibration import make_batches
from sparsepress.errors import InputError, RecipeError
from sparsepress.experts.adaptive import calibrate_routing, expert_counts, routing_top_p, set_routing
from sparsepress.experts.calibration import ExpertCalibration
from sparsepress.experts.grouped import module_experts, native_handle, reference_experts, run_experts
from sparsepress.experts.routing import collect_routing
from sparsepress.experts.surgery import align_neurons, remove_experts_
from sparsepress.models.moe import find_moe_layers, fuse_experts_, unfuse_experts_  # noqa: F401
from sparsepress.nn import SparseLinear
from sparsepress.nn.experts import Expert, RoutedExperts, select_top_p
from sparsepress.prune.stats import LayerStats

FAST = {"format": "bitmask", "solver": {"mask_search": 0}}
PRUNE_INT8 = {"stages": [{"experts": {"prune": 0.25}}, {"prune": {"method": "magnitude", "sparsity": 0.5}},
                         {"quantize": {"method": "rtn", "bits": 8}}], **FAST}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _plain(model):
    """What `sparsepress export --to hf` builds: a fresh transformers model of the (rewritten) config with
    every packed layer dequantized and the experts folded back into fused tensors."""
    from sparsepress.interop.hf.export import plain_model

    return plain_model(model)


def _batches(n=6, length=16):
    return make_batches(token_ids(n, length), 3, 0)


# ---------------------------------------------------------------- adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_layers_and_unfuse_fuse_round_trip(family):
    model = tiny_moe(family)
    layers = find_moe_layers(model)
    assert [layer.layout for layer in layers] == ["fused", "fused"]
    assert all(layer.num_experts == 8 and layer.top_k == 2 for layer in layers)
    ids = torch.randint(0, VOCAB, (2, 9))
    before = _logits(model, ids)
    unfuse_experts_(model)
    assert [layer.layout for layer in find_moe_layers(model)] == ["routed", "routed"]
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    fuse_experts_(model)
    assert [layer.layout for layer in find_moe_layers(model)] == ["fused", "fused"]
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_route_reproduces_the_family_router(family):
    model = tiny_moe(family)
    layer = find_moe_layers(model)[0]
    x = torch.randn(7, 32)
    logits, weights, index = layer.router(x)
    mine_w, mine_i = layer.route(logits)
    torch.testing.assert_close(mine_i, index)
    torch.testing.assert_close(mine_w, weights.float(), atol=1e-6, rtol=1e-6)


def test_routers_and_shared_expert_gates_stay_dense():
    model = sp.compress(tiny_moe("qwen2_moe"), PRUNE_INT8, calibration=token_ids(4))
    block = model.model.layers[0].mlp
    assert not isinstance(block.shared_expert_gate, SparseLinear)
    assert isinstance(block.shared_expert.up_proj, SparseLinear)  # the shared expert is compressed as a dense MLP
    assert "model.layers.0.mlp.gate" not in model.sparsepress_record.layers


# ---------------------------------------------------------------- compress, save, load, generate, export


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_save_load_generate_export(family, tmp_path):
    model = sp.compress(tiny_moe(family), PRUNE_INT8, calibration=token_ids(6))
    layer = find_moe_layers(model)[0]
    assert layer.num_experts == 6 and layer.router.weight.shape == (6, 32)
    key = "num_local_experts" if family == "mixtral" else "num_experts"
    assert getattr(model.config, key) == 6
    experts = layer.experts
    assert all(isinstance(m, SparseLinear) and m.packed.dtype == "int8" for m in experts.projections())
    ids = torch.randint(0, VOCAB, (2, 10))
    expected = _logits(model, ids)
    sp.save(model, tmp_path / "out")
    loaded = sp.load(tmp_path / "out")
    torch.testing.assert_close(_logits(loaded, ids), expected)
    assert loaded.sparsepress_manifest["experts"]["layers"][layer.name]["experts"] == 6
    assert len(loaded.sparsepress_manifest["experts"]["layers"][layer.name]["removed"]) == 2
    generated = loaded.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)
    torch.testing.assert_close(generated, model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False))
    # a plain transformers folder: the rewritten config and the dequantized weights, no sparsepress needed
    import transformers

    plain = _plain(loaded)
    plain.save_pretrained(tmp_path / "plain")
    reread = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.float32).eval()
    assert type(reread).__name__ == type(model).__name__
    assert not any(isinstance(m, (SparseLinear, RoutedExperts)) for m in reread.modules())
    torch.testing.assert_close(_logits(reread, ids), _logits(plain, ids), atol=1e-5, rtol=1e-5)
    # int8 activations are quantized per token in the packed model only (and a near tie in the router can
    # then pick another expert): close, not equal
    assert torch.nn.functional.cosine_similarity(_logits(reread, ids).flatten(), expected.flatten(), dim=0) > 0.9


def test_calibrated_per_expert_solve_matches_dense_closely():
    model = tiny_moe("qwen3_moe")
    dense = copy.deepcopy(model)
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq"}}], **FAST}
    model = sp.compress(model, recipe, calibration=token_ids(8, 24))
    ids = torch.randint(0, VOCAB, (2, 12))
    magnitude = sp.compress(copy.deepcopy(dense), {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}], **FAST},
                            calibration=token_ids(2))
    cos = lambda m: float(torch.nn.functional.cosine_similarity(_logits(m, ids).flatten(), _logits(dense, ids).flatten(), dim=0))  # noqa: E731
    assert cos(model) > cos(magnitude)
    assert model.sparsepress_record.layers["model.layers.0.mlp.experts.3.down_proj"]["method"] == "sparsegpt"


def test_export_refuses_nothing_when_experts_stage_is_on_a_dense_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(RecipeError, match="mixture-of-experts"):
        sp.compress(dense, {"stages": [{"experts": {"prune": 0.25}}]}, calibration=token_ids(2))


@pytest.mark.parametrize("body, field", [({"prune": 1.0}, "prune"), ({"by": "size"}, "by"), ({"top_p": 0.0}, "top_p"),
                                         ({"bogus": 1}, "bogus")])
def test_experts_stage_is_validated(body, field):
    import yaml

    with pytest.raises(RecipeError, match=field):
        sp.Recipe.from_yaml_text(yaml.safe_dump({"stages": [{"experts": body}]}))


# ---------------------------------------------------------------- routing statistics


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_statistics_are_consistent(family):
    model = tiny_moe(family)
    batches = make_batches([torch.randint(0, VOCAB, (n,)) for n in (16, 9, 12)], 3, 0)  # padded
    stats = collect_routing(model, batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    for layer in stats.values():
        assert layer.n_tokens == real  # padding is left out
        assert float(layer.tokens.sum()) == real * 2
        torch.testing.assert_close(layer.coactivation.diagonal(), layer.tokens)
        torch.testing.assert_close(layer.coactivation, layer.coactivation.T)
        torch.testing.assert_close(float(layer.router_prob.sum()), float(real))
        if family in ("mixtral", "qwen2_moe"):  # top-k renormalised: each token's gate mass is 1
            torch.testing.assert_close(float(layer.gate_mass.sum()), float(real))
        assert (layer.reap[layer.tokens > 0] > 0).all()
        assert float(layer.top_share.sum()) == real
        assert layer.logit_similarity().diagonal().sub(1).abs().max() < 1e-6


def test_routing_statistics_of_the_list_layout_match_the_fused_model():
    batches = _batches()
    fused = collect_routing(tiny_moe("mixtral"), batches)
    legacy = collect_routing(legacy_mixtral(), batches)
    for name in fused:
        legacy_name = name.replace("mlp", "mlp")
        torch.testing.assert_close(legacy[legacy_name].tokens, fused[name].tokens)
        torch.testing.assert_close(legacy[legacy_name].reap, fused[name].reap, atol=1e-5, rtol=1e-4)


def test_inspect_shows_routing_and_plots(tmp_path):
    from typer.testing import CliRunner

    from sparsepress.cli import app

    recipe = {"stages": [{"experts": {"prune": 0.25, "top_p": "auto"}}, {"quantize": {"method": "rtn"}}], **FAST}
    sp.save(sp.compress(tiny_moe("qwen3_moe"), recipe, calibration=token_ids(4)), tmp_path / "m")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m"), "--plot", str(tmp_path / "routing.png")])
    assert result.exit_code == 0, result.output
    assert "routing on the calibration data" in result.output and "adaptive routing" in result.output
    assert (tmp_path / "routing.png").stat().st_size > 10_000


# ---------------------------------------------------------------- expert removal and merging


def test_removal_by_frequency_drops_the_least_routed_experts():
    model = unfuse_experts_(tiny_moe("qwen3_moe"))
    stats = collect_routing(model, _batches())
    counts = {name: layer.tokens.clone() for name, layer in stats.items()}
    removed = remove_experts_(model, stats, prune=0.25, by="frequency")
    for name, gone in removed.items():
        assert sorted(gone) == sorted(torch.argsort(counts[name], stable=True)[:2].tolist())
        assert all(v is None for v in gone.values())
        assert stats[name].kept == [e for e in range(8) if e not in gone]
    # router, experts, statistics and config agree
    for layer in find_moe_layers(model):
        assert layer.router.weight.shape[0] == layer.num_experts == layer.router.num_experts == 6
    assert model.config.num_experts == 6
    fresh = collect_routing(model, _batches())
    assert all(layer.num_experts == 6 for layer in fresh.values())


def test_removed_expert_is_gone_from_the_forward():
    model = unfuse_experts_(tiny_moe("mixtral"))
    stats = collect_routing(model, _batches())
    ids = torch.randint(0, VOCAB, (1, 8))
    removed = remove_experts_(model, stats, prune=0.25, by="reap")
    layer = find_moe_layers(model)[0]
    kept = [e for e in range(8) if e not in removed[layer.name]]
    # the remaining router rows are the kept experts' original rows
    original = find_moe_layers(tiny_moe("mixtral"))[0].router.weight
    torch.testing.assert_close(layer.router.weight, original[kept])
    assert _logits(model, ids).isfinite().all()


def test_random_removal_depends_on_the_seed():
    picks = []
    for seed in (0, 1, 2):
        model = unfuse_experts_(tiny_moe("olmoe"))
        picks.append(sorted(remove_experts_(model, collect_routing(model, _batches(), reap=False), 0.5, "random", seed=seed)
                            ["model.layers.0.mlp"]))
    assert len({tuple(p) for p in picks}) > 1


def test_merge_folds_into_the_most_similar_expert():
    model = unfuse_experts_(tiny_moe("qwen3_moe"))
    stats = collect_routing(model, _batches())
    before = {e: copy.deepcopy(model.model.layers[0].mlp.experts[e]) for e in range(8)}
    removed = remove_experts_(model, stats, prune=0.25, by="frequency", merge=True)["model.layers.0.mlp"]
    targets = {v for v in removed.values()}
    assert None not in targets
    experts = model.model.layers[0].mlp.experts
    kept = stats["model.layers.0.mlp"].kept
    for position, original in enumerate(kept):
        changed = not torch.equal(experts[position].down_proj.weight, before[original].down_proj.weight)
        assert changed == (original in targets)
    assert _logits(model, torch.randint(0, VOCAB, (1, 6))).isfinite().all()


def test_align_neurons_recovers_a_permutation():
    a = Expert(torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(6, 8, bias=False))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))
    b = Expert(torch.nn.Linear(8, 12, bias=False), torch.nn.Linear(6, 8, bias=False))
    with torch.no_grad():
        b.gate_up_proj.weight.copy_(a.gate_up_proj.weight[torch.cat([perm, perm + 6])])
        b.down_proj.weight.copy_(a.down_proj.weight[:, perm])
    found = align_neurons(a, b)
    assert torch.equal(perm[found], torch.arange(6))


def test_list_layout_removal_and_compression():
    model = legacy_mixtral()
    stats = collect_routing(model, _batches())
    remove_experts_(model, stats, 0.25, "gate_mass")
    block = model.model.layers[0].mlp
    assert len(block.experts) == block.gate.out_features == block.num_experts == 6
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}], **FAST}
    model = sp.compress(model, recipe, calibration=token_ids(6))
    assert isinstance(block.experts[0].w1, SparseLinear) and not isinstance(block.gate, SparseLinear)
    assert _logits(model, torch.randint(0, VOCAB, (1, 6))).isfinite().all()


# ---------------------------------------------------------------- per-expert calibration and allocation


def test_expert_hooks_see_only_their_routed_tokens():
    model = unfuse_experts_(tiny_moe("qwen3_moe"))
    batches = _batches()
    stats = collect_routing(model, batches)
    layer = find_moe_layers(model)[0]
    seen = {e: LayerStats(32) for e in range(8)}
    handles = [layer.experts[e].gate_up_proj.register_forward_pre_hook(lambda _m, a, _e=e: seen[_e].add(a[0]))
               for e in range(8)]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for handle in handles:
        handle.remove()
    # every calibration batch here is unpadded, so the hooks and the statistics count the same tokens
    assert [seen[e].n_tokens for e in range(8)] == stats[layer.name].tokens.long().tolist()


def test_cold_experts_fall_back_on_all_token_statistics():
    model = unfuse_experts_(tiny_moe("qwen3_moe"))
    with torch.no_grad():  # expert 7 of layer 0 is never chosen
        model.model.layers[0].mlp.gate.weight[7] = -100.0
    calibration = ExpertCalibration(model)
    block = model.model.layers[0]
    from sparsepress.passes.blocks import capture_block_inputs

    inputs = capture_block_inputs(model, block, _batches())
    names = [f"model.layers.0.mlp.experts.{e}.gate_up_proj" for e in (0, 7)]
    stats = {name: LayerStats(32, name=name) for name in names}
    stats[names[0]].add(torch.randn(40, 32))
    finished = calibration.finish(block, stats, inputs)
    assert finished[names[0]].n_tokens == 40  # warm enough (>= 32 inputs): its own statistics only
    assert finished[names[1]].n_tokens == 32  # never routed: 32 tokens' worth of the all-token statistics
    assert torch.isfinite(finished[names[1]].hessian).all() and finished[names[1]].hessian.diagonal().min() > 0
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq"}}], **FAST}
    compressed = sp.compress(model, recipe, calibration=token_ids(6))
    assert compressed.model.layers[0].mlp.experts[7].down_proj.packed.sparsity >= 0.49


def test_usage_allocation_keeps_hot_experts_denser():
    recipe = {"stages": [{"experts": {"allocation": "usage", "usage_temperature": 0.1}},
                         {"prune": {"method": "wanda", "sparsity": 0.5}}], **FAST}
    model = sp.compress(tiny_moe("qwen3_moe"), recipe, calibration=token_ids(8))
    record = model.sparsepress_record
    usage = record.extra["experts"].routing["model.layers.0.mlp"].usage
    targets = [record.layers[f"model.layers.0.mlp.experts.{e}.down_proj"]["target_sparsity"] for e in range(8)]
    assert abs(sum(targets) / 8 - 0.5) < 1e-6
    assert targets[int(usage.argmax())] < 0.5 < targets[int(usage.argmin())]


def test_usage_allocation_needs_an_unstructured_prune_stage():
    with pytest.raises(RecipeError, match="allocation"):
        sp.compress(tiny_moe("qwen3_moe"), {"stages": [{"experts": {"allocation": "usage"}}]}, calibration=token_ids(2))


# ---------------------------------------------------------------- adaptive routing


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 4), st.floats(0.05, 1.0), st.integers(0, 1000))
def test_top_p_keeps_the_fewest_slots_reaching_the_mass(tokens, k, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.rand(tokens, k, generator=g) + 1e-3
    index = torch.stack([torch.randperm(8, generator=g)[:k] for _ in range(tokens)])
    new_index, new_weights = select_top_p(index, weights, top_p, 8)
    kept = new_index < 8
    assert kept.any(dim=1).all()  # every token keeps its top slot
    torch.testing.assert_close(new_weights.sum(dim=1), weights.sum(dim=1))  # the token's mass is preserved
    share = weights / weights.sum(dim=1, keepdim=True)
    for t in range(tokens):
        chosen = share[t][kept[t]]
        assert float(chosen.sum()) >= min(top_p, 1.0) - 1e-5 or kept[t].all()
        if kept[t].sum() > 1:  # minimal: without its smallest kept slot the mass would fall short
            assert float(chosen.sum() - chosen.min()) < top_p + 1e-6
        assert torch.equal(new_index[t][kept[t]], index[t][kept[t]])


def test_set_routing_cuts_expert_evaluations_and_is_a_controller_knob():
    from sparsepress.adaptive import KNOBS, operating_points

    model = sp.compress(tiny_moe("qwen3_moe"), {"stages": [{"experts": {"top_p": "auto", "max_loss_rise": 0.5}},
                                                          {"quantize": {"method": "rtn"}}], **FAST},
                        calibration=token_ids(6))
    ids = torch.randint(0, VOCAB, (2, 12))
    set_routing(model, None)
    expert_counts(model, reset=True)
    _logits(model, ids)
    full = expert_counts(model, reset=True)
    assert full.per_token == 2.0 and full.bytes_read > 0
    set_routing(model, 0.6)
    assert routing_top_p(model) == 0.6
    _logits(model, ids)
    assert expert_counts(model).per_token < 2.0
    assert "top_p" in {k.name for k in KNOBS}
    levels = model.sparsepress_routing_levels
    assert levels[0] == 1.0 and len(levels) > 1
    assert any(dict(p).get("top_p") == levels[-1] for p in operating_points(model))
    ctl = sp.AdaptiveController(model, target_ms=1e6, costs={(("top_p", v),): 10 - i for i, v in enumerate(levels)})
    ctl(input_ids=ids)
    assert ctl.level == {"top_p": 1.0}


def test_routing_points_are_measured_and_restore_the_routing():
    model = unfuse_experts_(tiny_moe("qwen2_moe"))
    set_routing(model, 0.9)
    points = calibrate_routing(model, _batches(), ladder=(1.0, 0.8, 0.5))
    assert [p.top_p for p in points] == [1.0, 0.8, 0.5]
    assert points[0].experts_per_token == 2.0 and points[-1].experts_per_token == 1.0
    assert points[0].loss_rise == 0.0
    assert routing_top_p(model) == 0.9


def test_set_routing_refuses_dense_models_and_bad_values():
    with pytest.raises(InputError):
        set_routing(torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(InputError):
        set_routing(unfuse_experts_(tiny_moe("olmoe")), 1.5)


# ---------------------------------------------------------------- grouped expert kernels


def _packed_experts(fmt: str, dtype: str, n_experts: int = 5, hidden: int = 64, inter: int = 48, bias: bool = False):
    torch.manual_seed(1)
    kwargs = {"nm": {"n": 2, "m": 4}, "bbs": {"bank": 16, "k": 8}}.get(fmt, {})
    experts = []
    for _ in range(n_experts):
        projections = []
        for out_f, in_f in ((2 * inter, hidden), (hidden, inter)):
            linear = torch.nn.Linear(in_f, out_f, bias=bias)
            with torch.no_grad():
                w = linear.weight
                if fmt == "nm":
                    w.view(out_f, -1, 4)[..., :2] = 0
                elif fmt == "bbs":
                    w.view(out_f, -1, 16)[..., :8] = 0
                elif fmt == "bitmask":
                    w[torch.rand_like(w) < 0.5] = 0
            projections.append(SparseLinear.from_linear(linear, format=fmt, dtype=dtype, **kwargs))
        experts.append(Expert(*projections))
    return RoutedExperts(experts, activation="silu")


def _routing(tokens: int, n_experts: int, k: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(n_experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    return index, weights / weights.sum(dim=1, keepdim=True)


@pytest.mark.native
@pytest.mark.parametrize("fmt, dtype", [("bitmask", "int8"), ("bitmask", "int4"), ("nm", "int8"), ("bbs", "int8"),
                                        ("dense", "int8"), ("bitmask", "fp32"), ("csr", "int8")])
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_grouped_native_matches_reference(fmt, dtype, tokens):
    if not native.native_available():
        pytest.skip("native extension not built")
    experts = _packed_experts(fmt, dtype, bias=fmt == "bitmask")
    assert native_handle(experts) is not None
    x = torch.randn(tokens, 64)
    index, weights = _routing(tokens, 5)
    got = run_experts(experts, x, index, weights)
    torch.testing.assert_close(got, reference_experts(experts, x, index, weights), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(got, module_experts(experts, x, index, weights), atol=2e-5, rtol=1e-5)


@pytest.mark.native
def test_grouped_reads_only_the_selected_experts():
    if not native.native_available():
        pytest.skip("native extension not built")
    experts = _packed_experts("bitmask", "int8", n_experts=6)
    handle_bytes = []
    for expert in experts:
        from sparsepress.kernels import _plan_of

        handle_bytes.append(sum(sum(t.numel() * t.element_size() for t in _plan_of(m.packed).tensors)
                                for m in (expert.gate_up_proj, expert.down_proj)))
    index = torch.tensor([[4, 1]])
    experts.counts.reset()
    run_experts(experts, torch.randn(1, 64), index, torch.tensor([[0.7, 0.3]]))
    assert experts.counts.evaluations == 2
    assert experts.counts.bytes_read == handle_bytes[4] + handle_bytes[1]
    # a dropped slot (top-p) is neither evaluated nor read
    experts.counts.reset()
    out = run_experts(experts, torch.randn(1, 64), torch.tensor([[4, 6]]), torch.tensor([[1.0, 0.0]]))
    assert experts.counts.evaluations == 1 and experts.counts.bytes_read == handle_bytes[4]
    assert out.shape == (1, 64)


@pytest.mark.native
def test_grouped_path_steps_aside_for_hooks_and_gradients():
    if not native.native_available():
        pytest.skip("native extension not built")
    experts = _packed_experts("bitmask", "int8")
    seen = []
    handle = experts[2].down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[0]))
    assert native_handle(experts) is None
    index = torch.tensor([[2, 0], [1, 2], [3, 4]])
    run_experts(experts, torch.randn(3, 64), index, torch.full((3, 2), 0.5))
    handle.remove()
    assert seen == [2]
    assert native_handle(experts) is not None


def test_routed_experts_survive_deepcopy_and_rebuild_their_handle():
    experts = _packed_experts("bitmask", "int8")
    x = torch.randn(4, 64)
    index, weights = _routing(4, 5)
    first = run_experts(experts, x, index, weights)
    twin = copy.deepcopy(experts)
    assert twin._grouped is None
    torch.testing.assert_close(run_experts(twin, x, index, weights), first)
