"""transformers, sentence-transformers, ONNX Runtime and generate on our folders, with the real libraries."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import sparsepress as sp
from sparsepress.cli import app
from sparsepress.interop.commands import export_folder
from sparsepress.interop.hf.quantizer import quantization_entry

LLAMA = Path(__file__).parent / "fixtures" / "tiny-llama"
RECIPE = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                     {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}


@pytest.fixture(scope="module")
def st_source(tmp_path_factory, tiny_bert_dir, minilm_path) -> Path:
    """A sentence-transformers layout around the tiny BERT (MiniLM's pooling, normalisation, tokenizer)."""
    folder = tmp_path_factory.mktemp("st") / "src"
    shutil.copytree(tiny_bert_dir, folder)
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(minilm_path / name, folder / name)
    shutil.copytree(minilm_path / "1_Pooling", folder / "1_Pooling")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True}))
    return folder


def _compress(source: Path, recipe: dict, out: Path, causal: bool = False) -> Path:
    from sparsepress.sources import load_source, read_text, token_samples

    src = load_source(source)
    ids = token_samples(src.tokenizer, read_text(None), 8, 32, seed=0)
    model = sp.compress(src.model, recipe, calibration=ids)
    model.sparsepress_source = str(source)
    return sp.save(model, out, source=source)


@pytest.fixture(scope="module")
def bert_folder(st_source, tmp_path_factory) -> Path:
    return _compress(st_source, RECIPE, tmp_path_factory.mktemp("bert") / "packed")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    recipe = {"stages": [{"prune": {"method": "wanda", "pattern": "2:4"}}, {"quantize": {"method": "rtn"}}], "format": "nm"}
    return _compress(LLAMA, recipe, tmp_path_factory.mktemp("llama") / "packed")


def _ids(vocab: int = 1000, shape=(2, 11)) -> torch.Tensor:
    return torch.randint(5, vocab, shape, generator=torch.Generator().manual_seed(5))


def test_saved_config_routes_from_pretrained_to_the_packed_model(bert_folder):
    from transformers import AutoModel

    assert json.loads((bert_folder / "config.json").read_text())["quantization_config"] == quantization_entry()
    ours, theirs = sp.load(bert_folder), AutoModel.from_pretrained(bert_folder)
    assert isinstance(theirs.encoder.layer[0].attention.self.query, sp.SparseLinear)
    assert isinstance(theirs.embeddings.word_embeddings, sp.QuantizedEmbedding) and not theirs.training
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).last_hidden_state, theirs(input_ids=ids).last_hidden_state)


def test_pipeline_and_generate_run_packed(llama_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(llama_folder)
    assert isinstance(model.model.layers[0].mlp.up_proj, sp.SparseLinear)
    tokenizer = AutoTokenizer.from_pretrained(llama_folder)
    prompt = tokenizer("The history of the", return_tensors="pt")
    ours = sp.load(llama_folder).generate(**prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False), ours)
    text = pipeline("text-generation", model=str(llama_folder))("The history of the", max_new_tokens=5, do_sample=False)
    assert text[0]["generated_text"].startswith("The history of the") and len(text[0]["generated_text"]) > 20


def test_without_sparsepress_from_pretrained_refuses_instead_of_random_weights(bert_folder):
    code = textwrap.dedent(f"""
        import sys
        sys.modules["sparsepress"] = None  # unimportable
        from transformers import AutoModel
        try:
            AutoModel.from_pretrained({str(bert_folder)!r})
        except OSError as exc:
            print("refused:", exc)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "refused:" in out.stdout, out.stderr[-2000:]


def test_old_folders_without_the_stamp_still_load(bert_folder, tmp_path):
    from sparsepress.io import MANIFEST, sha256_of

    old = tmp_path / "old"
    shutil.copytree(bert_folder, old)
    config = json.loads((old / "config.json").read_text())
    del config["quantization_config"]
    (old / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["config_sha256"] = sha256_of(old / "config.json")
    (old / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    ids = _ids()
    with torch.no_grad():
        a = sp.load(old)(input_ids=ids).last_hidden_state
        b = sp.load(bert_folder)(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)
    st = sp.load_sentence_transformer(old)
    assert isinstance(st[0].auto_model.encoder.layer[0].output.dense, sp.SparseLinear)


def test_sentence_transformer_encode_matches_ours(bert_folder):
    st = sp.load_sentence_transformer(bert_folder)
    model = sp.load(bert_folder)
    assert isinstance(st[0].auto_model.encoder.layer[1].intermediate.dense, sp.SparseLinear)
    texts = ["The river flows into the sea.", "A short one.", "Sparse models run fast on ordinary CPUs today."]
    got = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    tokens = st.tokenize(texts)
    with torch.no_grad():
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                       token_type_ids=tokens.get("token_type_ids")).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)  # MiniLM's pooling + Normalize
    assert torch.allclose(got, expected, atol=1e-5)


def test_sentence_transformer_on_a_compressed_tensors_folder(tmp_path, st_source):
    pytest.importorskip("compressed_tensors")
    from ct_fixtures import write_ct_folder

    from sparsepress.sources import load_source

    model = load_source(st_source).model
    folder = write_ct_folder(tmp_path / "ct", "w8a8-bitmask", model=model)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json",
                 "sentence_bert_config.json", "config_sentence_transformers.json"):
        shutil.copy(st_source / name, folder / name)
    shutil.copytree(st_source / "1_Pooling", folder / "1_Pooling")
    st = sp.load_sentence_transformer(folder)
    packed = sp.load(folder)
    assert isinstance(st[0].auto_model.encoder.layer[0].attention.self.query, sp.SparseLinear)
    tokens = st.tokenize(["compressed tensors in, packed kernels out"])
    with torch.no_grad():
        hidden = packed(**{k: v for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}).last_hidden_state
    expected = torch.nn.functional.normalize(hidden[0].mean(0), dim=-1)
    assert torch.allclose(torch.as_tensor(st.encode(["compressed tensors in, packed kernels out"]))[0], expected, atol=1e-5)


_PLAIN_LOAD = """
import sys, json, torch
sys.modules["sparsepress"] = None  # sparsepress unimportable: plain transformers only
import transformers
folder, kind = sys.argv[1], sys.argv[2]
cls = transformers.AutoModelForCausalLM if kind == "causal" else transformers.AutoModel
model = cls.from_pretrained(folder).eval()
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    out = model(input_ids=ids)
    result = {"out": (out.logits if kind == "causal" else out.last_hidden_state).tolist()}
    if kind == "causal":
        result["generated"] = model.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False).tolist()
print(json.dumps(result))
"""


def _plain(folder: Path, kind: str, ids: torch.Tensor) -> dict:
    out = subprocess.run([sys.executable, "-c", _PLAIN_LOAD, str(folder), kind, json.dumps(ids.tolist())],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_export_hf_loads_without_sparsepress(bert_folder, tmp_path):
    lines = export_folder(bert_folder, "hf", tmp_path / "hf")
    out = tmp_path / "hf"
    assert (out / "model.safetensors").is_file() and (out / "modules.json").is_file() and (out / "tokenizer.json").is_file()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    assert "magnitude" in card and "agreement with the packed model" in card and any("fidelity" in line for line in lines)
    ids = _ids(shape=(2, 9))
    plain = torch.tensor(_plain(out, "encoder", ids)["out"])
    with torch.no_grad():
        packed = sp.load(bert_folder)(input_ids=ids).last_hidden_state
    # int8 activations at run time are the only difference
    assert torch.nn.functional.cosine_similarity(plain.flatten(1), packed.flatten(1)).min() > 0.995


def test_export_hf_of_a_dense_fp32_folder_is_exact_and_decoders_generate(tmp_path):
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}], "format": "dense"}
    folder = _compress(LLAMA, recipe, tmp_path / "dense")
    export_folder(folder, "hf", tmp_path / "hf")
    ids = _ids(shape=(2, 7))
    result = _plain(tmp_path / "hf", "causal", ids)
    packed = sp.load(folder)
    with torch.no_grad():
        expected = packed(input_ids=ids).logits
        generated = packed.generate(input_ids=ids[:1], max_new_tokens=6, do_sample=False)
    assert torch.allclose(torch.tensor(result["out"]), expected, atol=1e-4)
    assert result["generated"] == generated.tolist()


def test_export_hf_refuses_shapes_the_config_cannot_express(bert_folder, tmp_path):
    from sparsepress.interop.hf.export import plain_model
    from sparsepress.models import replace_module

    model = sp.load(bert_folder)
    narrower = sp.SparseLinear.from_linear(torch.nn.Linear(64, 96), format="dense", dtype="fp32")
    replace_module(model, "encoder.layer.1.intermediate.dense", narrower)
    with pytest.raises(sp.InputError, match="per-layer sizes a plain transformers config cannot express"):
        plain_model(model)


@pytest.mark.parametrize("dtype, floor", [("fp32", 0.9999), ("int8", 0.99)])
def test_export_onnx_runs_in_onnxruntime(bert_folder, tmp_path, dtype, floor):
    pytest.importorskip("onnxruntime")
    from sparsepress.interop.onnx import onnx_agreement, onnx_session

    export_folder(bert_folder, "onnx", tmp_path / "onnx", dtype=dtype)
    report = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    name = "model.onnx" if dtype == "fp32" else "model_int8.onnx"
    assert name in report["files"] and (tmp_path / "onnx" / "tokenizer.json").is_file()
    ids = [_ids(shape=(1, n))[0] for n in (5, 23)]
    assert onnx_agreement(sp.load(bert_folder), tmp_path / "onnx" / name, report["inputs"], ids) > floor
    assert onnx_session(tmp_path / "onnx" / name).get_outputs()[0].name == "last_hidden_state"


def test_cli_generate_streams_and_times_against_dense(llama_folder):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["generate", str(llama_folder), "--prompt", "The history of the", "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("The history of the") and "decode tokens/s (dense)" in result.output
    refused = CliRunner().invoke(app, ["export", str(llama_folder), "--to", "gguf", "--out", "x"])
    assert refused.exit_code == 1 and "allowed: hf | onnx | compressed-tensors" in refused.output


def test_generate_decoder_registry_is_pluggable():
    from sparsepress.interop.generate import timed_generate

    seen: list[int] = []

    def native_stub(model, ids, mask, n, emit):
        for token in range(10, 10 + n):
            emit(token)
        return list(range(10, 10 + n))

    timing = timed_generate(None, torch.tensor([[1, 2]]), 5, native_stub, seen.append)
    assert timing.tokens == seen == [10, 11, 12, 13, 14] and timing.decode_tokens_per_s > 0


def test_gpt2_conv1d_from_pretrained_and_exports(tmp_path):
    """GPT-2's Conv1D layers: packed as Linear, loaded by from_pretrained, exported back to Conv1D for hf,
    refused (nothing written) for compressed-tensors, which has no Conv1D layout."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from tiny import token_ids

    torch.manual_seed(0)
    source = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}], "format": "bitmask"}
    folder = sp.save(sp.compress(source, recipe, calibration=token_ids(4)), tmp_path / "gpt2")
    ours, theirs = sp.load(folder), AutoModelForCausalLM.from_pretrained(folder)
    ids = _ids(100, (2, 9))
    with torch.no_grad():
        expected = ours(ids).logits
        assert torch.equal(theirs(ids).logits, expected)
        export_folder(folder, "hf", tmp_path / "hf")
        plain = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
        assert torch.nn.functional.cosine_similarity(plain(ids).logits.flatten(), expected.flatten(), dim=0) > 0.999
    with pytest.raises(sp.InputError, match="Conv1D layers have no compressed-tensors layout"):
        export_folder(folder, "compressed-tensors", tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
