"""MoE decoders in the native runtime (sparsepress.runtime.moe_plan): the Stack's MoE blocks against the
module path (transformers' MoE blocks with sparsepress's grouped expert layer inside) on every supported
family, dense int8 and 50% + int8, with experts removed, with adaptive routing; the variants that stay on
their modules, and why."""

from __future__ import annotations

import pytest
import torch

import sparsepress as sp
from sparsepress import native
from sparsepress.experts.adaptive import expert_counts, set_routing
from sparsepress.runtime import (
    NativeDecoder,
    build_plan,
    generate,
    native_blocks_of,
    native_blocks_reason,
    use_native_blocks,
)
from tiny_moe import FAMILIES, VOCAB, legacy_mixtral, tiny_moe, token_ids

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.native_available(), reason="native extension not built")]

INT8 = {"stages": [{"quantize": {"method": "rtn", "bits": 8}}], "format": "dense"}
SPARSE_INT8 = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn", "bits": 8}}],
               "format": "bitmask"}
RECIPES = {"int8": INT8, "50%+int8": SPARSE_INT8}
# expert removal (25% of each layer's experts, routers' rows with them), then 50% + int8
REMOVED = {"stages": [{"experts": {"prune": 0.25, "by": "frequency"}}, *SPARSE_INT8["stages"]], "format": "bitmask"}


@pytest.fixture(scope="module")
def models() -> dict[tuple[str, str], torch.nn.Module]:
    return {(family, recipe): sp.compress(tiny_moe(family, layers=3), RECIPES[recipe], calibration=token_ids(4))
            for family in FAMILIES for recipe in RECIPES}


def _prompt(batch: int = 2, length: int = 6, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _module_logits(model: torch.nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    forward = native_blocks_of(model)
    if forward is None:  # a model on its modules anyway
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False, **kw).logits
    forward.enabled = False
    try:
        with torch.inference_mode():
            return model(input_ids=ids, use_cache=False, **kw).logits
    finally:
        forward.enabled = True


def _theirs(model: torch.nn.Module, ids: torch.Tensor, tokens: int, attention_mask: torch.Tensor | None = None,
            steps: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The module path's greedy tokens: each step a whole forward through transformers' modules (no cache).

    Not transformers' cached `generate()`: its cached attention rounds differently in the last bits, and
    on these tiny random MoE models int8 activation rounding and top-k routing turn such bits into
    different tokens within ~10 steps (measured: its uncached forward disagrees with it as the native
    loop does, which agrees with that forward to ~1e-7). `steps` collects each step's last logits.
    """
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    for _ in range(tokens):
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = _module_logits(model, ids, attention_mask=mask, position_ids=positions)[:, -1]
        if steps is not None:
            steps.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return float((a - b).norm()) <= rel * float(a.norm()) + 1e-6


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_models_get_a_native_plan_with_moe_blocks(models, family, recipe):
    model = models[(family, recipe)]
    forward = native_blocks_of(model)
    assert forward is not None, native_blocks_reason(model)
    assert forward.plan.stack.moe_blocks == 3
    assert len(forward.plan.moe.experts) == 3


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_native_prefill_matches_the_module_path(models, family, recipe):
    model = models[(family, recipe)]
    ids = _prompt(3, 9)
    forward = native_blocks_of(model)
    before = forward.native_calls
    with torch.inference_mode():
        fast = model(input_ids=ids, use_cache=False).logits
    assert forward.native_calls == before + 1
    assert _close(_module_logits(model, ids), fast)


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_native_moe_decode_matches_the_module_path(models, family, recipe):
    model = models[(family, recipe)]
    ids = _prompt()
    ours = generate(model, ids, max_new_tokens=10)
    steps: list[torch.Tensor] = []
    assert ours.tolist() == _theirs(model, ids, 10, steps=steps).tolist()
    # and the logits of every step: the native decoder's (the sequence so far as one prompt) against the modules'
    decoder = NativeDecoder(model)
    for n, logits in enumerate(steps):
        assert _close(logits, decoder.scores(ours[:, :ids.shape[1] + n]))


@pytest.mark.parametrize("isa", native.supported_isas())
def test_every_isa_tree_runs_the_moe_blocks_alike(models, isa):
    model = models[("qwen2_moe", "50%+int8")]  # routed experts and the gated shared expert
    previous = native.active_isa()
    try:
        native.set_isa(isa)
        ids = _prompt(1, 5)
        with torch.inference_mode():
            fast = model(input_ids=ids, use_cache=False).logits
        assert _close(_module_logits(model, ids), fast)
        assert generate(model, ids, max_new_tokens=6).tolist() == _theirs(model, ids, 6).tolist()
    finally:
        native.set_isa(previous)


def test_left_padded_batches_decode_alike(models):
    model = models[("qwen3_moe", "50%+int8")]
    ids = _prompt(2, 7, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ours = generate(model, ids, max_new_tokens=8, attention_mask=mask)
    assert ours.tolist() == _theirs(model, ids, 8, attention_mask=mask).tolist()
    with torch.inference_mode():  # transformers' cached generate() agrees here too
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_removed_experts_decode_natively(family):
    model = sp.compress(tiny_moe(family, layers=2), REMOVED, calibration=token_ids(4))
    assert {len(e) for e in native_blocks_of(model).plan.moe.experts} == {6}  # 8 experts, 2 removed per layer
    ids = _prompt(seed=7)
    assert generate(model, ids, max_new_tokens=8).tolist() == _theirs(model, ids, 8).tolist()


def test_adaptive_routing_is_read_per_call_and_counted_alike(models):
    model = models[("mixtral", "50%+int8")]
    ids = _prompt(1, 6, seed=9)
    try:
        for top_p in (0.5, None):
            set_routing(model, top_p)
            expert_counts(model, reset=True)
            ours = generate(model, ids, max_new_tokens=8)
            assert expert_counts(model, reset=True).tokens == 3 * (6 + 7)  # the prompt, then 7 one-token steps
            assert ours.tolist() == _theirs(model, ids, 8).tolist()
            expert_counts(model, reset=True)
            with torch.inference_mode():
                model(input_ids=ours, use_cache=False)  # the native Stack
            native_counts = expert_counts(model, reset=True)
            _module_logits(model, ours)
            module_counts = expert_counts(model, reset=True)
            assert native_counts == module_counts  # tokens, evaluations and bytes read
            assert (native_counts.per_token < 2.0) == (top_p is not None)
            assert native_blocks_of(model) is not None  # switching routing keeps the plan
    finally:
        set_routing(model, None)


def test_the_stack_adds_prefill_counts_to_the_layers(models):
    model = models[("qwen2_moe", "int8")]
    expert_counts(model, reset=True)
    with torch.inference_mode():
        model(input_ids=_prompt(2, 5), use_cache=False)
    counts = expert_counts(model, reset=True)
    assert counts.tokens == 3 * 10 and counts.evaluations == 2 * 3 * 10 and counts.bytes_read > 0


def _route(logits: torch.Tensor, top_k: int, normalize: bool, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.empty(logits.shape[0], top_k, dtype=torch.int64)
    weights = torch.empty(logits.shape[0], top_k)
    native.module().moe_route(logits, top_k, normalize, top_p, index, weights)
    return index, weights


def test_routing_matches_the_families_routers():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for normalize in (False, True):
        probs = torch.softmax(logits, dim=-1)
        weights, index = torch.topk(probs, 2, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        got_index, got_weights = _route(logits, 2, normalize, 1.0)
        assert torch.equal(got_index, index)
        assert torch.allclose(got_weights, weights, atol=1e-6)


def test_adaptive_routing_matches_select_top_p():
    from sparsepress.nn.experts import select_top_p

    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 2
    probs = torch.softmax(logits, dim=-1)
    weights, index = torch.topk(probs, 3, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    for top_p in (0.5, 0.7, 0.9):
        want_index, want_weights = select_top_p(index, weights, top_p, 8)
        got_index, got_weights = _route(logits, 3, True, top_p)
        assert torch.equal(got_index, want_index)
        assert torch.allclose(got_weights, want_weights, atol=1e-6)


# ---------------------------------------------------------------- what stays on the modules


def test_list_layout_experts_stay_on_their_modules_with_the_reason():
    model = sp.compress(legacy_mixtral(), INT8, calibration=token_ids(2))
    assert native_blocks_of(model) is None
    assert "list experts have no native block" in native_blocks_reason(model)
    with pytest.raises(sp.InputError, match="list experts have no native block"):
        generate(model, _prompt(), max_new_tokens=2)
    with torch.inference_mode():
        assert model.generate(_prompt(), max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 8)


def test_experts_left_unpacked_are_refused_with_the_reason():
    recipe = {"stages": [{"quantize": {"method": "rtn", "bits": 8, "ignore": [".*experts.*"]}}], "format": "dense"}
    model = sp.compress(tiny_moe("qwen3_moe"), recipe, calibration=token_ids(2))
    assert native_blocks_of(model) is None
    assert native_blocks_reason(model) == ("model.layers.0.mlp.experts.0.gate_up_proj is a Linear, not a packed layer "
                                           "with a native kernel")


def test_clipped_qkv_is_refused_with_the_reason():
    model = tiny_moe("olmoe")
    model.config.clip_qkv = 4.0
    model = sp.compress(model, INT8, calibration=token_ids(2))
    assert native_blocks_of(model) is None
    assert "clip_qkv" in native_blocks_reason(model)


def test_a_replaced_expert_makes_the_plan_stale():
    model = sp.compress(tiny_moe("qwen3_moe"), INT8, calibration=token_ids(2))
    forward = native_blocks_of(model)
    experts = model.model.layers[0].mlp.experts
    experts.set_experts_(list(experts))  # the same experts re-adopted: nothing changed
    assert forward.plan.guard.current()
    first, second, *rest = list(experts)
    experts.set_experts_([second, first, *rest])  # two experts swapped: the router now picks others
    assert not forward.plan.guard.current()
    ids = _prompt(1, 5)
    assert generate(model, ids, max_new_tokens=6).tolist() == _theirs(model, ids, 6).tolist()  # a new plan


def test_fused_experts_of_an_uncompressed_model_are_refused_with_the_reason():
    assert build_plan(tiny_moe("mixtral")) == ("model.layers.0.mlp.experts: fused experts have no native block (the grouped "
                                               "kernel runs sparsepress's routed experts: compress or sp.load the model)")


def test_switching_native_blocks_off_records_why(monkeypatch):
    monkeypatch.setenv("SPARSEPRESS_NATIVE_BLOCKS", "0")
    model = sp.compress(tiny_moe("qwen3_moe"), INT8, calibration=token_ids(2))
    assert not use_native_blocks(model)
    assert "SPARSEPRESS_NATIVE_BLOCKS" in native_blocks_reason(model)
