"""Elastic sparsity levels on the native whole-stack path (sparsepress.runtime): the Stack runs the level
of each call's snapshot, agrees with the module path at every level, follows `set_sparsity` with nothing
rebuilt, and a call never mixes levels; the fused GEMM over a level's segments equals the reference."""

from __future__ import annotations

import pytest
import torch
from switching_helpers import calls_while_switching
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress import native
from sparsepress.formats import ElasticWeight
from sparsepress.kernels import elastic_linear, elastic_native_plan, reference_elastic_linear
from sparsepress.runtime import NativeDecoder, build_plan, native_blocks_of

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.native_available(), reason="native extension not built")]

LEVELS = [0.5, 0.7, 0.9]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": LEVELS}},
                         {"quantize": {"method": "gptq", "bits": 8}}], "solver": {"mask_search": 0}}
    return sp.compress(tiny_bert(), recipe, calibration=token_ids(8, 16))


def _inputs(batch: int = 3, seq: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[-1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _run(model: torch.nn.Module, inputs: dict, native_path: bool) -> torch.Tensor:
    forward = native_blocks_of(model)
    forward.enabled = native_path
    try:
        with torch.inference_mode():
            return model(**inputs).last_hidden_state
    finally:
        forward.enabled = True


def test_elastic_models_get_a_native_plan(model):
    plan = build_plan(model)
    assert not isinstance(plan, str), plan
    assert plan.stack.elastic_levels == len(LEVELS)
    assert native_blocks_of(model) is not None


@pytest.mark.parametrize("batch,seq", [(1, 2), (3, 10), (2, 40)])  # row kernels, GEMM, GEMM over long calls
def test_native_stack_matches_the_module_path_at_every_level(model, batch, seq):
    inputs = _inputs(batch, seq)
    keep = inputs["attention_mask"].bool()
    forward = native_blocks_of(model)
    outputs = []
    for level in LEVELS:
        sp.set_sparsity(model, level)
        reference = _run(model, inputs, native_path=False)
        before = forward.native_calls
        fast = _run(model, inputs, native_path=True)
        assert forward.native_calls == before + 1, level
        a, b = reference[keep], fast[keep]
        assert float((a - b).norm()) <= 1e-3 * float(a.norm()), (level, batch, seq)
        outputs.append(fast)
    sp.set_sparsity(model, LEVELS[0])
    # switching changes what the native path computes (the level is read per call)
    assert not torch.allclose(outputs[0], outputs[2], atol=1e-3)


def test_native_calls_each_see_one_level_while_another_thread_switches(model):
    inputs = _inputs()
    expected = []
    for level in LEVELS:
        sp.set_sparsity(model, level)
        expected.append(_run(model, inputs, native_path=True))
    forward = native_blocks_of(model)
    before = forward.native_calls
    mixed = calls_while_switching(lambda: model(**inputs).last_hidden_state, expected,
                                  switch=lambda: [sp.set_sparsity(model, level) for level in LEVELS])
    sp.set_sparsity(model, LEVELS[0])
    assert mixed == 0
    assert forward.native_calls == before + 30  # 3 callers x 10 calls, all on the native Stack


def test_a_level_outside_the_stack_is_refused(model):
    plan = build_plan(model)
    x = torch.zeros(1, 2, plan.hidden)
    with pytest.raises(ValueError, match="level 3 out of range for 3 levels"):
        plan.stack.forward_raw(x.data_ptr(), x.data_ptr(), 1, 2, 0, [0, 0, 0], False, 0, 0, False, 1, 0, 3)


def test_the_native_decoder_runs_the_level_set_when_generation_starts():
    """Elastic decoders decode natively: scores equal the module path's last logits at every level, greedy
    tokens equal transformers' generate, and `set_sparsity` between generations changes what runs."""
    import transformers as T

    from sparsepress.runtime import generate

    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": [0.5, 0.8]}}, {"quantize": {"method": "rtn"}}]}
    model = sp.compress(llama.eval(), recipe, calibration=token_ids(4, 12))
    if native_blocks_of(model) is None:
        pytest.skip("no native plan for this model here")
    decoder = NativeDecoder(model)
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    scores = []
    for level in (0.5, 0.8):
        sp.set_sparsity(model, level)
        with torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits[:, -1]
            theirs = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
        scores.append(decoder.scores(ids))
        assert torch.allclose(scores[-1], logits, atol=1e-4, rtol=1e-4), level
        assert generate(model, ids, max_new_tokens=6).tolist() == theirs.tolist(), level
    assert not torch.allclose(scores[0], scores[1], atol=1e-3)
    sp.set_sparsity(model, 0.5)


@pytest.mark.parametrize("levels", [[0.05, 0.1, 0.6], [0.3, 0.5, 0.95], [0.2, 0.4, 0.6, 0.8]])
def test_fused_segments_gemm_matches_the_reference(isa, levels):
    """Dense and quad tiles mixed inside one level's sum (a 95%-kept top segment packs dense tiles), 1..3
    segments per level, 16 and 70 tokens (fused GEMM on trees that have it), with a fused activation."""
    gen = torch.Generator().manual_seed(11)
    rows, cols = 80, 200
    weight = torch.randn(rows, cols, generator=gen)
    score = weight.abs()
    keeps = [score >= score.flatten().kthvalue(max(1, int(s * score.numel()))).values for s in levels]
    for i in range(1, len(keeps)):
        keeps[i] &= keeps[i - 1]
    packed = ElasticWeight.pack(weight * keeps[0], dtype="int8", keeps=keeps, levels=levels,
                                gains=0.5 + torch.rand(len(levels), rows, generator=gen))
    bias = torch.randn(rows, generator=gen)
    for level in range(len(levels)):
        for tokens in (16, 70):
            x = torch.randn(tokens, cols, generator=gen)
            for activation in (None, "gelu"):
                ref = reference_elastic_linear(x, packed, level, bias)
                if activation:
                    ref = torch.nn.functional.gelu(ref)
                got = elastic_linear(x, packed, level, bias, activation=activation)
                assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max()), (isa, level, tokens)
    handle = elastic_native_plan(packed)
    assert handle.panel_segments in (0, len(levels))
