"""Decoder families through the adapters: LLaMA (GQA), GPT-2 (Conv1D, tied head), OPT.

Small random-initialised models built from transformers config classes (no downloads) are compressed
with SparseGPT + GPTQ, checked layer by layer, and round-tripped through sp.save / sp.load.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import sparsepress as sp
from sparsepress.models import find_layout, linear_layers

VOCAB = 96
SPARSE_INT8 = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                          {"quantize": {"method": "gptq", "bits": 8}},
                          {"quantize_embeddings": {"bits": 8}}]}


def _llama(tie: bool = False) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, word_embed_proj_dim=64, pad_token_id=1)
    return OPTForCausalLM(config).eval()


BUILDERS = {"llama": _llama, "gpt2": _gpt2, "opt": _opt}
BLOCK_PREFIX = {"llama": "model.layers.", "gpt2": "transformer.h.", "opt": "model.decoder.layers."}
LINEARS_PER_BLOCK = {"llama": 7, "gpt2": 4, "opt": 6}


def _calibration() -> list[torch.Tensor]:
    return [torch.randint(2, VOCAB, (24,), generator=torch.Generator().manual_seed(i)) for i in range(6)]


def _probe() -> torch.Tensor:
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(99))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@functools.lru_cache(maxsize=None)
def _compressed(family: str) -> tuple[nn.Module, nn.Module]:
    dense = BUILDERS[family]()
    return copy.deepcopy(dense), sp.compress(dense, SPARSE_INT8, calibration=_calibration())


@pytest.fixture(scope="module")
def compressed():
    """family -> (dense copy, compressed model), each compressed once, on first use."""

    class _Lazy(dict):
        def __missing__(self, family):
            return _compressed(family)

    yield _Lazy()
    _compressed.cache_clear()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_every_block_linear_is_sparse_int8_at_half_sparsity(compressed, family):
    _, model = compressed[family]
    layout = find_layout(model)
    assert layout.adapter == family and len(layout.blocks) == 2
    assert all(name.startswith(BLOCK_PREFIX[family]) for name, _ in layout.blocks)
    in_blocks = [(n, m) for n, m in model.named_modules() if n.startswith(BLOCK_PREFIX[family])]
    assert not [n for n, m in in_blocks if isinstance(m, nn.Linear)], "a Linear inside a block was left dense"
    sparse = [(n, m) for n, m in in_blocks if isinstance(m, sp.SparseLinear)]
    assert len(sparse) == 2 * LINEARS_PER_BLOCK[family]
    for name, layer in sparse:
        assert layer.packed.dtype == "int8", name
        assert abs(layer.packed.sparsity - 0.5) < 0.02, (name, layer.packed.sparsity)
        assert model.sparsepress_record.layers[name]["method"] == "sparsegpt"


def test_llama_gqa_keeps_narrow_key_value_projections(compressed):
    dense, model = compressed["llama"]
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features) == (64, 32, 32)
    assert attn.k_proj.out_features == dense.model.layers[0].self_attn.k_proj.out_features


@pytest.mark.parametrize("family", list(BUILDERS))
def test_compressed_logits_stay_close_to_dense(compressed, family):
    dense, model = compressed[family]
    ids = _probe()
    cosine = torch.nn.functional.cosine_similarity(_logits(model, ids), _logits(dense, ids), dim=-1)
    # Random weights at 50% keep most of the logit direction; a transposed Conv1D or a mis-fed
    # block input (wrong positions or mask) drops this far lower.
    assert float(cosine.mean()) > 0.8


@pytest.mark.parametrize("family", list(BUILDERS))
def test_save_load_gives_same_logits(compressed, family, tmp_path):
    _, model = compressed[family]
    sp.save(model, tmp_path / family)
    loaded = sp.load(tmp_path / family)
    assert type(loaded) is type(model) and not loaded.training
    ids = _probe()
    assert torch.allclose(_logits(loaded, ids), _logits(model, ids), atol=1e-4)
    for name, layer in model.named_modules():
        if isinstance(layer, sp.SparseLinear):
            assert isinstance(loaded.get_submodule(name), sp.SparseLinear), name


def test_gpt2_conv1d_conversion_is_exact():
    dense = _gpt2()
    converted = sp.models.convert_conv1d_(copy.deepcopy(dense))
    assert len(linear_layers(converted.transformer.h[0])) == 4
    ids = _probe()
    assert torch.allclose(_logits(converted, ids), _logits(dense, ids), atol=1e-5)


def test_gpt2_tied_embedding_is_skipped_and_stays_tied_through_save_load(compressed, tmp_path):
    _, model = compressed["gpt2"]
    embeddings = model.sparsepress_record.embeddings
    assert embeddings["transformer.wte"]["bits"] is None and "tied" in embeddings["transformer.wte"]["skipped"]
    assert embeddings["transformer.wpe"]["bits"] == 8
    assert isinstance(model.transformer.wte, nn.Embedding) and model.lm_head.weight is model.transformer.wte.weight
    sp.save(model, tmp_path / "g")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g" / sp.io.TENSORS), "pt") as handle:
        stored = set(handle.keys())
    assert ("lm_head.weight" in stored) != ("transformer.wte.weight" in stored), "tied table stored twice"
    loaded = sp.load(tmp_path / "g")
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    assert isinstance(loaded.transformer.wpe, sp.QuantizedEmbedding)


def test_llama_tied_embeddings_round_trip():
    model = _llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = sp.compress(model, SPARSE_INT8, calibration=_calibration()[:2])
    assert model.sparsepress_record.embeddings["model.embed_tokens"]["bits"] is None
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_llama_untied_embedding_is_quantized(compressed):
    dense, model = compressed["llama"]
    table = model.model.embed_tokens
    assert isinstance(table, sp.QuantizedEmbedding) and table.bits == 8
    assert isinstance(model.lm_head, nn.Linear)  # outside every block: left dense
    reference = dense.model.embed_tokens.weight.detach()
    error = (table.weight - reference).abs().amax(dim=1)
    assert bool((error <= reference.abs().amax(dim=1) / 254 + 1e-6).all())  # half a step of the row's scale


def test_opt_learned_positions_are_not_replaced(compressed):
    _, model = compressed["opt"]
    entry = model.sparsepress_record.embeddings["model.decoder.embed_positions"]
    assert entry["bits"] is None and "custom forward" in entry["skipped"]
    assert type(model.model.decoder.embed_positions).__name__ == "OPTLearnedPositionalEmbedding"


def test_llama_two_four_packs_as_nm_and_round_trips(tmp_path):
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}},
                         {"quantize": {"method": "gptq", "bits": 8}}], "format": "nm"}
    model = sp.compress(_llama(), recipe, calibration=_calibration()[:4])
    layers = [m for n, m in model.named_modules() if isinstance(m, sp.SparseLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.packed.name == "nm"
        groups = (layer.weight != 0).reshape(layer.out_features, -1, 4).sum(dim=-1)
        assert int(groups.max()) <= 2
    sp.save(model, tmp_path / "nm")
    ids = _probe()
    assert torch.allclose(_logits(sp.load(tmp_path / "nm"), ids), _logits(model, ids), atol=1e-4)


FUSED = {"llama": ("mlp.gate_proj", "silu"), "gpt2": ("mlp.c_fc", "gelu_tanh"), "opt": ("fc1", "relu")}


@pytest.mark.parametrize("family", list(BUILDERS))
def test_mlp_activation_is_fused_into_its_linear(compressed, family):
    """Found by watching a forward pass, not by names: each block's MLP input projection carries the
    activation, the activation module became Identity, and the logits equal the unfused model's."""
    from sparsepress.fusion import fuse_activations

    _, model = compressed[family]
    suffix, kind = FUSED[family]
    fused = {name: m.activation for name, m in model.named_modules() if getattr(m, "activation", None) == kind}
    assert sorted(fused) == [f"{BLOCK_PREFIX[family]}{i}.{suffix}" for i in range(2)]
    unfused = copy.deepcopy(model)
    for name, module in unfused.named_modules():
        if name in fused:
            module.activation = None
    for parent in unfused.modules():  # put the activation modules back where the Identity stands
        for attr, child in list(parent._modules.items()):
            if isinstance(child, nn.Identity) and any(f"{p}." in f"{n}." for n in fused for p in [n.rsplit(".", 1)[0]]):
                from transformers.activations import ACT2FN

                act = {"silu": "silu", "gelu_tanh": "gelu_new", "relu": "relu"}[kind]
                parent._modules[attr] = ACT2FN[act]
    torch.testing.assert_close(_logits(model, _probe()), _logits(unfused, _probe()), rtol=1e-3, atol=1e-3)
    assert fuse_activations(model) == []  # idempotent: nothing left to fuse
