"""compressed-tensors in and out: folders written by the compressed-tensors library load onto our packed
formats with the library's own weights, bit for bit; unsupported schemes are refused by name; export
and re-import are exact."""

from __future__ import annotations

import json

import pytest
import torch

import sparsepress as sp
from sparsepress.cli import app
from sparsepress.formats import BitmaskWeight, DenseWeight, NMWeight
from sparsepress.interop.commands import export_folder
from tiny import tiny_bert, token_ids

LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj")


@pytest.fixture(scope="module")
def ct():
    return pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def ct_folders(ct, tmp_path_factory):
    from ct_fixtures import CT_CASES, write_ct_folder

    root = tmp_path_factory.mktemp("ct")
    return {case: write_ct_folder(root / case, case) for case in CT_CASES}


def _unpacked(model, name):
    module = model.get_submodule(name)
    return module.weight.detach()


EXPECTED = {
    "w8a8-24": (NMWeight, "int8"), "w8a8-bitmask": (BitmaskWeight, "int8"), "w8-naive-group": (DenseWeight, "int8"),
    "w4a16-group": (DenseWeight, "int4"), "w4a16-asym-24": (NMWeight, "int8"), "w4a16-asym-channel": (DenseWeight, "int8"),
    "w8a8-tensor": (DenseWeight, "int8"), "fp32-bitmask": (BitmaskWeight, "fp32"),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_library_folders_load_packed_with_the_librarys_weights(ct_folders, case):
    from ct_fixtures import ct_reference_weight

    model = sp.load(ct_folders[case])
    for name in LAYERS:
        layer = model.get_submodule(name)
        cls, dtype = EXPECTED[case]
        assert isinstance(layer, sp.SparseLinear) and isinstance(layer.packed, cls) and layer.packed.dtype == dtype
        assert torch.equal(_unpacked(model, name), ct_reference_weight(ct_folders[case], name)), (case, name)
    assert isinstance(model.lm_head, torch.nn.Linear)  # ignored by the scheme: stays dense float
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_outputs_match_the_dequantized_reference(ct_folders):
    """Our packed run against a plain float model holding the library's decompressed weights."""
    from ct_fixtures import ct_reference_weight, tiny_llama

    folder = ct_folders["w8a8-24"]
    model = sp.load(folder)
    reference = tiny_llama()
    state = {k: v for k, v in sp.load(folder).state_dict().items() if k in reference.state_dict()}
    reference.load_state_dict(state, strict=False)
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.weight.data = ct_reference_weight(folder, name)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    from sparsepress.runtime import native_blocks_of

    forward = native_blocks_of(model)
    assert forward is not None  # a compressed-tensors folder runs on the native Stack like our own
    before = forward.native_calls
    with torch.no_grad():
        ours, theirs = model(ids, use_cache=False).logits, reference(ids).logits
    assert forward.native_calls == before + 1
    # the only difference: our kernels quantize activations per token to int8
    assert torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0) > 0.999


def test_sharded_folder_with_index(ct, tmp_path):
    from ct_fixtures import ct_reference_weight, write_ct_folder

    folder = write_ct_folder(tmp_path / "sharded", "w8a8-24", shard="40KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    model = sp.load(folder)
    for name in LAYERS:
        assert torch.equal(_unpacked(model, name), ct_reference_weight(folder, name))


def test_asymmetric_int8_beyond_int8_is_refused_naming_the_layer(ct_folders):
    with pytest.raises(sp.TensorLayoutError, match=r"layer 'model\.layers\.\d\.[a-z_.]+': codes minus zero points span"):
        sp.load(ct_folders["w8-asym"])


@pytest.mark.parametrize("change, message", [
    ({"format": "marlin-24"}, "quantization format 'marlin-24'"),
    ({"format": "nvfp4-pack-quantized"}, "NVFP4"),
    ({"format": "zip-quantized"}, "'zip-quantized' \\(unknown to sparsepress"),
    ({"sparsity_config": {"format": "sparse-blocks"}}, "sparsity format 'sparse-blocks'"),
    ({"transform_config": {"config_groups": {"u": {}}}}, "transform_config"),
])
def test_unsupported_configs_are_refused_by_name(ct_folders, tmp_path, change, message):
    import shutil

    folder = tmp_path / "bad"
    shutil.copytree(ct_folders["w8a8-24"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sp.FormatError, match=message):
        sp.load(folder)


def test_float_weights_type_refused(ct_folders, tmp_path):
    import shutil

    folder = tmp_path / "fp8"
    shutil.copytree(ct_folders["w8a8-24"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "float"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(sp.FormatError, match="weights of type 'float' are not supported"):
        sp.load(folder)


@pytest.mark.parametrize("case", ["w8a8-24", "w8a8-bitmask", "w4a16-group", "w4a16-asym-24", "fp32-bitmask"])
def test_in_out_in_is_exact_and_the_library_reads_our_output(ct_folders, tmp_path, case):
    from ct_fixtures import ct_reference_weight

    first = sp.load(ct_folders[case])
    export_folder(ct_folders[case], "compressed-tensors", tmp_path / "out")
    again = sp.load(tmp_path / "out")
    for name in LAYERS:
        assert torch.equal(_unpacked(first, name), _unpacked(again, name))
        assert torch.equal(_unpacked(again, name), ct_reference_weight(tmp_path / "out", name))
    for key, value in first.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def _ours(tmp_path, fmt, bits=8, pattern="unstructured", group_size=None):
    recipe = {"stages": [{"prune": {"method": "magnitude", "pattern": pattern, "sparsity": 0.5, "bank": 16}},
                         {"quantize": {"method": "rtn", "bits": bits, "group_size": group_size}},
                         {"quantize_embeddings": {"bits": 8}}], "format": fmt}
    model = sp.compress(tiny_bert(), recipe, calibration=token_ids(4))
    return sp.save(model, tmp_path / f"ours-{fmt}-{bits}")


@pytest.mark.parametrize("fmt, bits, pattern, lost", [
    ("nm", 8, "2:4", None), ("bitmask", 8, "unstructured", None), ("bbs", 8, "bbs", "bbs layout written as bitmask"),
    ("dense", 4, "unstructured", None), ("csr", 8, "unstructured", "csr layout"),
])
def test_ours_out_in_is_exact(tmp_path, fmt, bits, pattern, lost):
    folder = _ours(tmp_path, fmt, bits, pattern, group_size=16 if bits == 4 else None)
    with pytest.warns(UserWarning, match="int8 embedding table written as float32"):
        lines = export_folder(folder, "compressed-tensors", tmp_path / "ct")
    assert (lost is None) or any(lost in line for line in lines)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == ("int-quantized" if bits == 8 else "pack-quantized")
    ours, back = sp.load(folder), sp.load(tmp_path / "ct")
    for name, module in ours.named_modules():
        if isinstance(module, sp.SparseLinear):
            assert torch.equal(module.weight, back.get_submodule(name).weight), name
            assert back.get_submodule(name).packed.dtype == module.packed.dtype
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(input_ids=ids).last_hidden_state
        b = back(input_ids=ids).last_hidden_state
    emb = ours.embeddings.word_embeddings
    assert torch.equal(emb.weight, back.embeddings.word_embeddings.weight)  # dequantized table, same values
    assert torch.allclose(a, b, atol=1e-4)


def test_cli_inspect_and_eval_accept_ct_folders(ct_folders, tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["inspect", str(ct_folders["w8a8-24"])])
    assert result.exit_code == 0, result.output
    assert "model.layers.0.self_attn.q_proj" in result.output and "nm" in result.output
    bad = CliRunner().invoke(app, ["inspect", str(ct_folders["w8-asym"])])
    assert bad.exit_code == 1 and "codes minus zero points" in bad.output


def test_a_ct_folder_saves_as_our_folder(ct_folders, tmp_path):
    from transformers import AutoModelForCausalLM

    model = sp.load(ct_folders["w4a16-asym-24"])
    ours = sp.load(sp.save(model, tmp_path / "ours"))
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]["quant_method"] == "sparsepress"
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(ours(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "ours")(ids).logits, expected)
