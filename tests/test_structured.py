"""Structured removal (channel / head / layer) with real shape change, per architecture family: removing
nothing is an identity, the config is rewritten, the folder reloads through sp.load (and, where the
config expresses the shapes, through plain transformers), GQA groups stay whole, and unsupported
models fail with one clear message before anything changes."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as T
from typer.testing import CliRunner

import sparsepress as sp
from sparsepress.cli import app
from sparsepress.models import convert_conv1d_
from sparsepress.models.anatomy import block_anatomies
from sparsepress.structured import block_parameters, remove_structure_
from sparsepress.recipe import PruneStage
from tiny import token_ids

VOCAB = 64
FAMILIES = {
    "bert": lambda: T.BertModel(T.BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                             intermediate_size=48, vocab_size=VOCAB)),
    "roberta": lambda: T.RobertaModel(T.RobertaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                      intermediate_size=48, vocab_size=VOCAB)),
    "mpnet": lambda: T.MPNetModel(T.MPNetConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                intermediate_size=48, vocab_size=VOCAB)),
    "distilbert": lambda: T.DistilBertModel(T.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=48,
                                                               vocab_size=VOCAB)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                            num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                      num_key_value_heads=2, intermediate_size=48, vocab_size=VOCAB)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                                      num_key_value_heads=2, head_dim=16, intermediate_size=48,
                                                      vocab_size=VOCAB)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=VOCAB)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=48,
                                                vocab_size=VOCAB, word_embed_proj_dim=32)),
}
# Families whose config computes the head size from hidden_size / heads: heads removed leave a model
# the plain config cannot express (its shapes live in the folder's manifest).
HEADS_NEED_SPARSEPRESS = {"bert", "roberta", "distilbert", "gpt2", "opt"}


def _model(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return convert_conv1d_(FAMILIES[family]()).eval()


def _ids() -> list[torch.Tensor]:
    return token_ids(8, length=12, vocab=VOCAB)


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, VOCAB, (2, 10), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(**_batch())
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _stage(pattern: str, sparsity: float, method: str = "sparsegpt") -> dict:
    return {"prune": {"method": method, "pattern": pattern, "sparsity": sparsity}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("pattern", ["channel", "head", "layer"])
def test_removing_nothing_is_an_identity(family, pattern):
    if family == "mpnet" and pattern == "head":
        pytest.skip("MPNet refuses head removal (test_mpnet_heads_are_refused)")
    model = _model(family)
    before, config = _out(model), model.config.to_dict()
    stage = PruneStage(method="magnitude", pattern=pattern, sparsity=0.0)
    record = remove_structure_(model, [stage], [])
    assert torch.equal(_out(model), before)
    assert record.plain_config and model.config.to_dict() == config
    assert record.parameters_after == record.parameters_before


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("pattern, sparsity", [("channel", 0.5), ("head", 0.5), ("layer", 0.34)])
def test_shapes_shrink_config_is_rewritten_and_the_folder_reloads(family, pattern, sparsity, tmp_path):
    if family == "mpnet" and pattern == "head":
        pytest.skip("MPNet refuses head removal")
    dense = _model(family)
    model = sp.compress(copy.deepcopy(dense), {"stages": [_stage(pattern, sparsity)]}, calibration=_ids())
    record = model.sparsepress_record.extra["structured"]
    assert block_parameters(model) < block_parameters(dense)
    assert record["parameters"]["after"] == block_parameters(model)
    config = model.config
    if pattern == "channel":
        width = block_anatomies(dense)[0].ffn_width // 2
        assert {b["ffn_width"] for b in record["blocks"]} == {width}
        key = next(k for k in ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim") if k in config.to_dict())
        assert getattr(config, key) == width
    if pattern == "layer":
        assert config.num_hidden_layers == 2 and len(record["blocks"]) == 2
        if getattr(config, "layer_types", None) is not None:
            assert len(config.layer_types) == 2
    if pattern == "head":
        assert {(b["heads"], b["kv_heads"]) for b in record["blocks"]} == ({(2, 1)} if "num_key_value_heads" in config.to_dict() and family != "opt" else {(2, 2)})
    assert record["plain_config"] == (pattern != "head" or family not in HEADS_NEED_SPARSEPRESS)
    expected = _out(model)
    folder = sp.save(model, tmp_path / "out")
    manifest = json.loads((folder / "sparsepress.json").read_text())
    assert manifest["structured"]["plain_config"] == record["plain_config"]
    assert torch.allclose(_out(sp.load(folder)), expected, atol=1e-5)
    if record["plain_config"]:
        # plain transformers builds the same shapes from the rewritten config.json alone
        plain = convert_conv1d_(type(model)(T.AutoConfig.from_pretrained(folder))).eval()
        plain.load_state_dict(model.state_dict())
        assert torch.allclose(_out(plain), expected, atol=1e-5)
    else:
        assert manifest["structured"]["reason"]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_gqa_groups_stay_whole(family):
    model = _model(family)
    anatomy = block_anatomies(model)[0]
    q = model.get_submodule(anatomy.q).weight.detach().clone()
    k = model.get_submodule(anatomy.kv[0]).weight.detach().clone()
    model = sp.compress(model, {"stages": [_stage("head", 0.5, "magnitude")]}, calibration=_ids())
    hd, size = anatomy.head_dim, anatomy.group_size
    new_q = model.get_submodule(anatomy.q).weight.detach()
    new_k = model.get_submodule(anatomy.kv[0]).weight.detach()
    kept = [g for g in range(anatomy.kv_heads) if torch.equal(new_k, k[g * hd:(g + 1) * hd])]
    assert len(kept) == 1  # one whole key head of two survives ...
    group = kept[0]
    assert torch.equal(new_q, q[group * size * hd:(group + 1) * size * hd])  # ... with exactly its query heads
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1


def test_sensitivity_allocation_gives_per_block_widths_that_sp_load_rebuilds(tmp_path):
    model = sp.compress(_model("llama"), {"stages": [{"prune": {"method": "wanda", "pattern": "channel", "sparsity": 0.5,
                                                                "allocation": "sensitivity"}}]}, calibration=_ids())
    record = model.sparsepress_record.extra["structured"]
    widths = [b["ffn_width"] for b in record["blocks"]]
    assert sum(widths) == 72 and len(set(widths)) > 1
    assert not record["plain_config"] and "FFN widths differ" in record["reason"]
    assert model.config.intermediate_size == 48  # the config keeps what it can say
    expected = _out(model)
    assert torch.allclose(_out(sp.load(sp.save(model, tmp_path / "o"))), expected, atol=1e-5)
    for to in ("hf", "compressed-tensors"):  # config.json cannot say it: refused, nothing written
        result = CliRunner().invoke(app, ["export", str(tmp_path / "o"), "--to", to, "--out", str(tmp_path / to)])
        assert result.exit_code != 0 and "differ per layer" in result.output and "FFN widths differ" in result.output
        assert not (tmp_path / to).exists()


@pytest.mark.parametrize("score", ["magnitude", "activation", "taylor"])
def test_scores_choose_and_refit_helps(score):
    dense = _model("bert")
    plain = sp.compress(copy.deepcopy(dense), {"stages": [{"prune": {"method": "wanda", "pattern": "channel",
                                                                     "sparsity": 0.5, "score": score}}]},
                        calibration=_ids())
    refit = sp.compress(copy.deepcopy(dense), {"stages": [{"prune": {"method": "sparsegpt", "pattern": "channel",
                                                                     "sparsity": 0.5, "score": score}}]},
                        calibration=_ids())
    # sparsegpt = the same units, then the FFN output projection refitted by least squares on calibration data
    reference = _out(dense)
    assert (_out(refit) - reference).norm() < (_out(plain) - reference).norm()


@pytest.mark.parametrize("score", ["influence", "loss"])
def test_layer_scores_remove_the_least_useful_block(score):
    model = _model("llama")
    with torch.no_grad():  # block 1 changes nothing: its outputs are zeroed
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    model = sp.compress(model, {"stages": [{"prune": {"pattern": "layer", "sparsity": 0.34, "score": score}}]},
                        calibration=_ids())
    assert model.sparsepress_record.extra["structured"]["steps"][0]["removed"] == [1]
    assert [b["source_index"] for b in model.sparsepress_record.extra["structured"]["blocks"]] == [0, 2]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]


def test_structured_then_unstructured_then_int8_in_one_recipe(tmp_path):
    recipe = {"stages": [_stage("channel", 0.3), {"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                         {"quantize": {"method": "gptq", "bits": 8}}]}
    model = sp.compress(_model("llama"), recipe, calibration=_ids())
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, sp.SparseLinear) and down.packed.shape[1] == 34
    assert abs(down.packed.sparsity - 0.5) < 0.02
    expected = _out(model)
    assert torch.allclose(_out(sp.load(sp.save(model, tmp_path / "o"))), expected, atol=1e-4)


def test_mpnet_heads_are_refused_before_anything_changes():
    model = _model("mpnet")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(sp.UnsupportedModelError, match="relative_attention_bias"):
        sp.compress(model, {"stages": [_stage("head", 0.5)]}, calibration=_ids())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unsupported_family_is_one_clear_message(tmp_path):
    model = T.ElectraModel(T.ElectraConfig(hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=48, vocab_size=VOCAB)).eval()
    with pytest.raises(sp.UnsupportedModelError, match="electra: structured pattern 'channel' is not supported"):
        sp.compress(model, {"stages": [_stage("channel", 0.5)]}, calibration=_ids())
    folder = tmp_path / "electra"
    model.save_pretrained(folder)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {pattern: channel, sparsity: 0.5}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(folder), "--recipe", str(recipe), "--out", str(out),
                                      "--calibration", str(recipe)])
    assert result.exit_code != 0
    assert not out.exists() and "Traceback" not in result.output


def test_recipe_rules_for_structured_stages():
    # (model_validate wraps a RecipeError in pydantic's ValidationError, a ValueError; from_yaml unwraps it)
    with pytest.raises(ValueError, match="at most once"):
        sp.Recipe.model_validate({"stages": [_stage("channel", 0.5), _stage("channel", 0.3)]})
    with pytest.raises(ValueError, match="score"):
        sp.Recipe.model_validate({"stages": [{"prune": {"pattern": "layer", "sparsity": 0.5, "score": "taylor"}}]})
    with pytest.raises(ValueError, match="allocation"):
        sp.Recipe.model_validate({"stages": [{"prune": {"pattern": "head", "sparsity": 0.5, "allocation": "owl"}}]})
    with pytest.raises(ValueError, match="score"):
        sp.Recipe.model_validate({"stages": [{"prune": {"sparsity": 0.5, "score": "taylor"}}]})
    both = sp.Recipe.model_validate({"stages": [_stage("head", 0.25), _stage("channel", 0.5),
                                                {"prune": {"method": "wanda", "pattern": "2:4"}}]})
    assert [s.pattern for s in both.structured] == ["head", "channel"] and both.prune.pattern == "2:4"
