"""The native whole-stack path (sparsepress.runtime) against the module path, on every supported family:
random-initialised small configs, compressed (50% + int8), padded batches; the fallbacks (what the
native path does not cover runs on modules and gives the same result); the switch; the decode loop."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as T

import sparsepress as sp
from sparsepress import native
from sparsepress.runtime import (
    NativeDecoder,
    build_plan,
    disable_native_blocks,
    generate,
    native_blocks_of,
    use_native_blocks,
)

pytestmark = [pytest.mark.native,
              pytest.mark.skipif(not native.native_available(), reason="native extension not built")]

VOCAB = 100
ENCODER_KW = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64}
DECODER_KW = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}

FAMILIES = {
    "bert": lambda: T.BertModel(T.BertConfig(**ENCODER_KW)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(**ENCODER_KW)),
    "xlm-roberta": lambda: T.XLMRobertaModel(T.XLMRobertaConfig(**ENCODER_KW)),
    "mpnet": lambda: T.MPNetModel(T.MPNetConfig(**ENCODER_KW)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                               hidden_dim=64)),
    "bert-classifier": lambda: T.BertForSequenceClassification(T.BertConfig(**ENCODER_KW, num_labels=3)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER_KW)),
    "llama-tied": lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER_KW, tie_word_embeddings=True)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER_KW, sliding_window=None)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER_KW)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER_KW, head_dim=32)),
}
DECODERS = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")
RECIPE = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                     {"quantize_embeddings": {"bits": 8}}]}


def _calibration() -> list[torch.Tensor]:
    return [torch.randint(3, VOCAB, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    built = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        built[name] = sp.compress(make().eval(), RECIPE, calibration=_calibration())
    return built


def _inputs(name: str, batch: int = 3, seq: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    if name in DECODERS:
        mask[-1, :3] = 0  # left padding, as generation pads
    else:
        mask[-1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if name in DECODERS:
        inputs["use_cache"] = False
    return inputs


def _tensors(out) -> list[torch.Tensor]:
    values = out.values() if hasattr(out, "values") else out
    return [t for t in values if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _both_paths(model: torch.nn.Module, inputs: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    forward = native_blocks_of(model)
    assert forward is not None
    with torch.inference_mode():
        forward.enabled = False
        reference = _tensors(model(**inputs))
        forward.enabled = True
        before = forward.native_calls
        fast = _tensors(model(**inputs))
    return reference, fast, forward.native_calls - before


@pytest.mark.parametrize("name", list(FAMILIES))
def test_native_stack_matches_the_module_path(models, name):
    model = models[name]
    inputs = _inputs(name)
    reference, fast, calls = _both_paths(model, inputs)
    assert calls == 1
    assert len(reference) == len(fast) >= 1
    keep = inputs["attention_mask"].bool()
    for a, b in zip(reference, fast):
        assert a.shape == b.shape
        if a.dim() == 3 and a.shape[:2] == keep.shape:  # per-token outputs: padded positions are free
            a, b = a[keep], b[keep]
        assert float((a - b).norm()) <= 1e-3 * float(a.norm()) + 1e-6


@pytest.mark.parametrize("isa", native.supported_isas())
def test_every_isa_tree_runs_the_stack_alike(models, isa):
    previous = native.active_isa()
    try:
        native.set_isa(isa)
        for name in ("bert", "qwen3"):
            reference, fast, calls = _both_paths(models[name], _inputs(name, batch=1))
            assert calls == 1
            for a, b in zip(reference, fast):
                assert float((a - b).norm()) <= 1e-3 * float(a.norm())
    finally:
        native.set_isa(previous)


def test_sp_load_installs_native_blocks(models, tmp_path):
    folder = sp.save(models["bert"], tmp_path / "bert")
    loaded = sp.load(folder)
    assert native_blocks_of(loaded) is not None
    reference, fast, calls = _both_paths(loaded, _inputs("bert"))
    assert calls == 1 and all(torch.allclose(a, b, atol=1e-4) for a, b in zip(reference, fast))


def test_outputs_it_does_not_produce_go_to_the_module_path(models):
    model = models["bert"]
    forward = native_blocks_of(model)
    inputs = _inputs("bert")
    before = forward.native_calls
    with torch.inference_mode():
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert forward.native_calls == before
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    with torch.inference_mode():  # and the next plain call is native again (capture hooks stay idle)
        model(**inputs)
    assert forward.native_calls == before + 1


def test_decoder_calls_with_a_cache_go_to_the_module_path(models):
    model = models["llama"]
    forward = native_blocks_of(model)
    inputs = {k: v for k, v in _inputs("llama").items() if k != "use_cache"}
    before = forward.native_calls
    with torch.inference_mode():
        out = model(**inputs, use_cache=True)
    assert forward.native_calls == before and out.cache is not None


def test_training_and_autograd_go_to_the_module_path(models):
    model = models["distilbert"]
    forward = native_blocks_of(model)
    inputs = _inputs("distilbert")
    before = forward.native_calls
    out = model(**inputs).last_hidden_state  # grad mode, parameters want gradients
    assert out.requires_grad and forward.native_calls == before
    model.train()
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.eval()
    assert forward.native_calls == before
    with torch.no_grad():
        model(**inputs)
    assert forward.native_calls == before + 1


def test_hooks_on_a_block_send_calls_to_the_module_path(models):
    model = models["mpnet"]
    forward = native_blocks_of(model)
    seen = []
    handle = model.encoder.layer[1].output.dense.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    try:
        before = forward.native_calls
        with torch.inference_mode():
            model(**_inputs("mpnet"))
        assert forward.native_calls == before and len(seen) == 1
    finally:
        handle.remove()


def test_a_replaced_layer_is_noticed():
    torch.manual_seed(0)
    model = sp.compress(FAMILIES["bert"]().eval(), RECIPE, calibration=_calibration())
    forward = native_blocks_of(model)
    layer = model.encoder.layer[0].intermediate.dense
    swapped = sp.SparseLinear.from_linear(torch.nn.Linear(layer.in_features, layer.out_features), format="dense",
                                          dtype="int8")
    swapped.activation = layer.activation  # the GELU was fused into the layer it replaces
    model.encoder.layer[0].intermediate.dense = swapped
    before = forward.native_calls
    with torch.inference_mode():
        model(**_inputs("bert"))
    assert forward.native_calls == before
    # a new plan takes the new layer in
    disable_native_blocks(model)
    assert use_native_blocks(model)
    assert native_blocks_of(model) is not forward


def test_switch_off_by_function_and_by_environment(models, monkeypatch):
    model = copy.deepcopy(models["qwen2"])
    assert native_blocks_of(model) is None  # a deep copy runs on its modules (the plan points into the original)
    assert use_native_blocks(model)
    assert disable_native_blocks(model) and native_blocks_of(model) is None
    monkeypatch.setenv("SPARSEPRESS_NATIVE_BLOCKS", "0")
    assert not use_native_blocks(model)
    monkeypatch.setenv("SPARSEPRESS_NATIVE_BLOCKS", "1")
    assert use_native_blocks(model)


def test_unsupported_models_are_refused_with_a_reason():
    dense = FAMILIES["bert"]().eval()
    assert "not a packed layer" in build_plan(dense)
    gpt2 = T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    assert "no native block plan" in build_plan(gpt2)
    assert not use_native_blocks(torch.nn.Linear(2, 2))


def test_the_install_check_refuses_another_models_plan(models):
    from sparsepress.runtime.entries import NativeForward, plain_forward
    from sparsepress.runtime.switch import _agrees, _nudged_outputs
    from sparsepress.fusion import probe_inputs

    own = models["bert"]
    torch.manual_seed(1)
    other = sp.compress(FAMILIES["bert"]().eval(), RECIPE, calibration=_calibration())
    disable_native_blocks(other)
    with torch.inference_mode():
        reference = other(**probe_inputs(other))[0]
    nudged = _nudged_outputs(other, probe_inputs(other), other.embeddings)
    spread = float((nudged - reference).norm() / reference.norm())
    assert 0 < spread < 1e-3  # a small model without outliers barely moves under a rounding-sized nudge
    # the native path of `own` answering for `other`: a wrong plan, refused
    forward = NativeForward(native_blocks_of(own).plan, plain_forward(other))
    other.forward = forward
    assert not _agrees(other, forward)
    # its own plan agrees
    disable_native_blocks(other)
    assert use_native_blocks(other)


def test_the_install_check_allows_what_the_module_path_itself_spreads():
    from sparsepress.runtime.switch import CEILING, TOLERANCE, outputs_agree

    reference = torch.randn(64, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(64, generator=torch.Generator().manual_seed(1))
    off = lambda rel: reference + noise * (rel * reference.norm() / noise.norm())  # noqa: E731
    assert outputs_agree(reference, off(TOLERANCE / 2))
    assert not outputs_agree(reference, off(2 * TOLERANCE))
    assert outputs_agree(reference, off(2 * TOLERANCE), nudged=off(TOLERANCE))
    assert not outputs_agree(reference, off(1.5 * CEILING), nudged=off(CEILING))


@pytest.mark.parametrize("name", DECODERS)
def test_native_greedy_decoding_matches_transformers_generate(models, name):
    model = models[name]
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ours = generate(model, ids, max_new_tokens=8, attention_mask=mask)
    with torch.inference_mode():
        theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_decoder_scores_are_the_models_last_logits(models):
    model = models["qwen3"]
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        logits = model(input_ids=ids, use_cache=False).logits[:, -1]
    scores = NativeDecoder(model).scores(ids)
    assert torch.allclose(scores, logits, atol=1e-4, rtol=1e-4)


def test_decoding_stops_at_eos_and_pads_finished_rows(models):
    model = models["llama"]
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(5))
    free = generate(model, ids, max_new_tokens=6)
    eos = int(free[0, 6])  # row 0's second new token
    out = generate(model, ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    row = out[0, 5:].tolist()
    assert row[:2] == free[0, 5:7].tolist() and all(t == 1 for t in row[2:])


def test_right_padding_is_refused_by_the_decoder(models):
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(sp.InputError, match="left padding"):
        generate(models["llama"], ids, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 0, 0]]))


def test_cli_bench_reports_prefill_and_decode_tokens_per_second(tmp_path):
    from pathlib import Path

    from typer.testing import CliRunner

    from sparsepress.cli import app

    fixture = Path(__file__).parent / "fixtures" / "tiny-llama"
    if not (fixture / "model.safetensors").is_file():
        pytest.skip("tests/fixtures/tiny-llama is missing")
    from sparsepress.sources import load_source

    source = load_source(fixture)
    model = sp.compress(source.model, {"stages": [{"quantize": {"method": "rtn"}},
                                                  {"quantize_embeddings": {"bits": 8, "head": True}}]},
                        tokenizer=source.tokenizer, samples=4, seq_len=32)
    folder = sp.save(model, tmp_path / "tiny", tokenizer=source.tokenizer, source=fixture)
    result = CliRunner().invoke(app, ["bench", str(folder), "--seq-len", "8", "--repeats", "3", "--new-tokens", "4",
                                      "--reference", str(fixture)])
    assert result.exit_code == 0, result.output
    assert "prefill" in result.output and "decode" in result.output and "tokens/s" in result.output
