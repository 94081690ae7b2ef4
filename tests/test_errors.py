"""Nothing lost, nothing silently wrong: every user mistake, damaged file or poisoned weight fails with
one clean message naming the culprit (CLI: exit non-zero, no traceback, nothing written)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import sparsepress as sp
from sparsepress.cli import app
from sparsepress.io import MANIFEST, TENSORS, sha256_of, verify_folder
from tiny import tiny_bert, token_ids

runner = CliRunner()


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _assert_clean_failure(result, *needles, code=1):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), repr(result.exception)
    for needle in needles:
        assert str(needle) in result.output, (needle, result.output)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output


# --- recipes -----------------------------------------------------------------------------------

BAD_RECIPES = [
    # (id, YAML, substrings the one message must hold: field, value, what is allowed, line)
    ("unknown-method", "stages:\n  - prune:\n      method: lottery\n      sparsity: 0.5\n",
     ["stages[0].prune.method", "'lottery'", "magnitude | wanda | sparsegpt", "line 3"]),
    ("unknown-pattern", "stages:\n  - prune:\n      method: wanda\n      pattern: diagonal\n      sparsity: 0.5\n",
     ["stages[0].prune.pattern", "'diagonal'", "unstructured", "N:M", "line 4"]),
    ("unknown-key", "stages:\n  - prune:\n      method: wanda\n      sparsty: 0.5\n",
     ["stages[0].prune.sparsty", "known keys", "sparsity", "line 4"]),
    ("unknown-top-key", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nfoo: 1\n",
     ["'foo'", "known keys: stages, budget, format, solver, seed", "line 3"]),
    ("unknown-stage", "stages:\n  - shrink: {amount: 2}\n",
     ["stages[0]", "'shrink'", "prune | quantize", "line 2"]),
    ("sparsity-one", "stages:\n  - prune:\n      method: wanda\n      sparsity: 1.0\n",
     ["stages[0].prune.sparsity", "1.0", "[0, 1)", "line 4"]),
    ("sparsity-negative", "stages:\n  - prune:\n      method: wanda\n      sparsity: -0.1\n",
     ["stages[0].prune.sparsity", "-0.1", "[0, 1)", "line 4"]),
    ("sparsity-text", "stages:\n  - prune:\n      method: wanda\n      sparsity: half\n",
     ["stages[0].prune.sparsity", "'half'", "number", "line 4"]),
    ("bits-3", "stages:\n  - quantize:\n      method: rtn\n      bits: 3\n",
     ["stages[0].quantize.bits", "3", "8 | 4", "line 4"]),
    ("nm-n-equals-m", "stages:\n  - prune:\n      method: wanda\n      pattern: '4:4'\n",
     ["stages[0].prune.pattern", "'4:4'", "0 < N < M", "line 4"]),
    ("nm-n-above-m", "stages:\n  - prune:\n      method: wanda\n      pattern: '5:4'\n",
     ["stages[0].prune.pattern", "'5:4'", "0 < N < M", "line 4"]),
    ("nm-sparsity-conflict", "stages:\n  - prune: {method: wanda, pattern: '2:4', sparsity: 0.7}\n",
     ["stages[0].prune.sparsity", "0.7", "0.5", "line 2"]),
    ("yaml-syntax", "stages:\n  - prune: {method: wanda, sparsity: 0.5\n", ["<yaml>", "valid YAML", "line 3"]),
    ("yaml-tab", "stages:\n\t- prune: {}\n", ["<yaml>", "valid YAML", "line 2"]),
    ("yaml-duplicate-key", "stages:\n  - prune: {method: wanda, sparsity: 0.5, sparsity: 0.6}\n",
     ["stages[0].prune.sparsity", "duplicate key", "line 2"]),
    ("bad-regex", "stages:\n  - prune:\n      method: wanda\n      sparsity: 0.5\n      targets: ['(']\n",
     ["stages[0].prune.targets", "'('", "regex", "line 5"]),
    ("targets-match-nothing", "stages:\n  - prune:\n      method: wanda\n      sparsity: 0.5\n      targets: ['nothing']\n",
     ["prune.targets", "'nothing'", "encoder.layer.0.attention.self.query"]),
    ("format-nm-unstructured", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nformat: nm\n",
     ["'format'", "'nm'", "N:M pattern", "line 3"]),
    ("format-bbs-unstructured", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nformat: bbs\n",
     ["'format'", "'bbs'", "pattern 'bbs'", "line 3"]),
    ("format-unknown", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nformat: zip\n",
     ["'format'", "'zip'", "auto | dense | bitmask | nm | bbs | csr", "line 3"]),
    ("duplicate-stage", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\n  - prune: {method: wanda, sparsity: 0.5}\n",
     ["'stages'", "'prune'", "at most once"]),
    ("empty-file", "", ["<top level>", "stages"]),
    ("top-level-list", "- a\n- b\n", ["<top level>", "a mapping"]),
    ("no-stages", "format: auto\n", ["'stages'", "required"]),
    ("empty-stages", "stages: []\n", ["'stages'", "non-empty"]),
    ("stage-not-mapping", "stages:\n  - prune\n", ["stages[0]", "'prune'", "single stage key", "line 2"]),
    ("group-size-small", "stages:\n  - quantize: {method: rtn, group_size: 3}\n",
     ["stages[0].quantize.group_size", "3", "8"]),
    ("seed-text", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nseed: abc\n", ["'seed'", "'abc'", "integer", "line 3"]),
    ("allocation-under-nm", "stages:\n  - prune: {method: wanda, pattern: '2:4', allocation: owl}\n",
     ["stages[0].prune.allocation", "'owl'", "uniform"]),
    ("sparsity-beside-budget", "stages:\n  - prune: {method: wanda, sparsity: 0.5}\nbudget: {size_mb: 12}\n",
     ["stages[0].prune.sparsity", "0.5", "no value with a budget"]),
    ("structured-score", "stages:\n  - prune: {method: wanda, sparsity: 0.5, pattern: layer, score: taylor}\n",
     ["stages[0].prune.score", "'taylor'", "influence | loss", "line 2"]),
    ("distill-rounds-nm", "stages:\n  - prune: {method: wanda, pattern: '2:4'}\n  - distill: {steps: 4, rounds: 2}\n",
     ["distill.rounds", "2", "unstructured | bbs | block"]),
]


@pytest.mark.parametrize("text, needles", [pytest.param(t, n, id=i) for i, t, n in BAD_RECIPES])
def test_bad_recipe_is_one_clean_message(text, needles, tiny_bert_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    out = tmp_path / "o"
    result = _cli("compress", tiny_bert_dir, "--recipe", recipe, "--out", out, "--samples", "2", "--seq-len", "16")
    _assert_clean_failure(result, "recipe field", *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # nothing written, no temp or checkpoint


def test_recipe_that_is_not_utf8_names_the_file(tiny_bert_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_bytes(b"\xff\xfe\x00garbage")
    result = _cli("compress", tiny_bert_dir, "--recipe", recipe, "--out", tmp_path / "o")
    _assert_clean_failure(result, str(recipe), "cannot read recipe")


def test_python_recipe_errors_are_recipe_errors():
    with pytest.raises(sp.RecipeError, match=r"stages\[0\].prune.pattern"):
        sp.Recipe.from_yaml_text("stages:\n  - prune: {pattern: '3:2'}\n")
    with pytest.raises(sp.RecipeError, match="line 2"):
        sp.Recipe.from_yaml_text("stages:\n  - prune: {method: x}\n")


# --- inputs ------------------------------------------------------------------------------------


@pytest.fixture()
def good_recipe(tmp_path) -> Path:
    path = tmp_path / "good.yaml"
    path.write_text("stages:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    return path


def _model_variant(tmp_path: Path, tiny_bert_dir: Path, name: str, weights: bool = True) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(tiny_bert_dir / "config.json", folder / "config.json")
    if weights:
        shutil.copy(tiny_bert_dir / "model.safetensors", folder / "model.safetensors")
    return folder


def test_model_folder_errors(tiny_bert_dir, good_recipe, tmp_path):
    out = tmp_path / "o"
    cases = []
    cases.append((tmp_path / "missing", "model folder not found"))
    cases.append((good_recipe, "not a folder"))
    no_weights = _model_variant(tmp_path, tiny_bert_dir, "noweights", weights=False)
    cases.append((no_weights, "no weights found"))
    pickled = _model_variant(tmp_path, tiny_bert_dir, "pickled", weights=False)
    # A pickle that would run code if anything unpickled it: it must never be opened.
    (pickled / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'touch /tmp/sparsepress-pwned'\ntR.")
    cases.append((pickled, "only pickle (.bin) weights found; sparsepress reads safetensors only"))
    no_config = tmp_path / "noconfig"
    no_config.mkdir()
    cases.append((no_config, "no config.json"))
    unknown = _model_variant(tmp_path, tiny_bert_dir, "unknown")
    config = json.loads((unknown / "config.json").read_text())
    config.update(model_type="frobnicator", architectures=["FrobnicatorModel"])
    (unknown / "config.json").write_text(json.dumps(config))
    import transformers

    cases.append((unknown, f"{unknown / 'config.json'}: unsupported architecture: model_type 'frobnicator' is not "
                           f"known to transformers {transformers.__version__}"))
    broken = _model_variant(tmp_path, tiny_bert_dir, "broken")
    (broken / "config.json").write_text("{broken")
    cases.append((broken, "cannot read the model config"))
    for folder, message in cases:
        result = _cli("compress", folder, "--recipe", good_recipe, "--out", out, "--samples", "2", "--seq-len", "16")
        _assert_clean_failure(result, folder, message)
        assert not out.exists()
    assert not Path("/tmp/sparsepress-pwned").exists()


def test_recipe_and_calibration_path_errors(tiny_bert_dir, good_recipe, tmp_path):
    out = tmp_path / "o"
    short = tmp_path / "short.txt"
    short.write_text("far too short")
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 10)
    cases = [
        (["--recipe", tmp_path], [tmp_path, "is a folder; expected a YAML recipe file"]),
        (["--recipe", tmp_path / "none.yaml"], [tmp_path / "none.yaml", "recipe file not found"]),
        (["--recipe", good_recipe, "--calibration", tmp_path], [tmp_path, "is a folder; expected a calibration text file"]),
        (["--recipe", good_recipe, "--calibration", tmp_path / "none.txt"], [tmp_path / "none.txt", "not found"]),
        (["--recipe", good_recipe, "--calibration", short], [short, "text too short"]),
        (["--recipe", good_recipe, "--calibration", binary], [binary, "cannot read calibration text"]),
        (["--recipe", good_recipe, "--on-nonfinite", "ignore"], ["--on-nonfinite", "'ignore'", "error | skip"]),
    ]
    for extra, needles in cases:
        result = _cli("compress", tiny_bert_dir, *extra, "--out", out, "--samples", "2", "--seq-len", "16")
        _assert_clean_failure(result, *needles)
        assert not out.exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_files_name_the_path(tiny_bert_dir, good_recipe, tmp_path):
    locked = tmp_path / "locked.yaml"
    locked.write_text(good_recipe.read_text())
    locked.chmod(0)
    calibration = tmp_path / "locked.txt"
    calibration.write_text("text " * 1000)
    calibration.chmod(0)
    try:
        result = _cli("compress", tiny_bert_dir, "--recipe", locked, "--out", tmp_path / "o")
        _assert_clean_failure(result, locked, "cannot read recipe")
        result = _cli("compress", tiny_bert_dir, "--recipe", good_recipe, "--calibration", calibration, "--out", tmp_path / "o")
        _assert_clean_failure(result, calibration, "cannot read calibration text")
    finally:
        locked.chmod(0o600)
        calibration.chmod(0o600)


def test_out_that_is_a_file_is_refused(tiny_bert_dir, good_recipe, tmp_path):
    result = _cli("compress", tiny_bert_dir, "--recipe", good_recipe, "--out", good_recipe)
    _assert_clean_failure(result, good_recipe, "not a folder")


def test_inspect_of_a_file_or_plain_folder(good_recipe, tmp_path):
    _assert_clean_failure(_cli("inspect", good_recipe), good_recipe, "not a folder")
    _assert_clean_failure(_cli("inspect", tmp_path), MANIFEST, "not a sparsepress folder")


# --- output safety -----------------------------------------------------------------------------


def test_interrupt_during_compression_keeps_the_old_folder(tiny_bert_dir, good_recipe, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old result")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sparsepress.pipeline.compress", interrupted)
    result = _cli("compress", tiny_bert_dir, "--recipe", good_recipe, "--out", out, "--overwrite", "--samples", "2",
                  "--seq-len", "16")
    assert result.exit_code == 130 and "Traceback" not in result.output and "interrupted" in result.output
    assert (out / "old.txt").read_text() == "old result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.yaml", "o"]


def test_crash_while_saving_keeps_the_old_folder(tiny_bert_dir, good_recipe, tmp_path, monkeypatch):
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("old result")

    def full_disk(*args, **kwargs):
        raise KeyboardInterrupt  # as if Ctrl-C arrived half-way through writing the tensors

    monkeypatch.setattr("sparsepress.io.save_file", full_disk)
    result = _cli("compress", tiny_bert_dir, "--recipe", good_recipe, "--out", out, "--overwrite", "--samples", "2",
                  "--seq-len", "16")
    assert result.exit_code == 130, result.output
    assert (out / "old.txt").read_text() == "old result"
    # No partial output; the finished blocks stay in the checkpoint for --resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".o.checkpoint", "good.yaml", "o"]


# --- damaged or hostile folders ------------------------------------------------------------------






@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                         {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}
    model = sp.compress(tiny_bert(), recipe, calibration=token_ids())
    return sp.save(model, tmp_path_factory.mktemp("saved") / "m")


def _reseal(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["tensors_sha256"] = sha256_of(folder / TENSORS)
    if (folder / "config.json").is_file():
        manifest["config_sha256"] = sha256_of(folder / "config.json")
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _rewrite_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / TENSORS))
    change(tensors)
    save_file(tensors, str(folder / TENSORS))
    _reseal(folder)


def _flip(folder):
    data = bytearray((folder / TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / TENSORS).write_bytes(bytes(data))


def _truncate(folder):
    data = (folder / TENSORS).read_bytes()
    (folder / TENSORS).write_bytes(data[: len(data) // 3])


def _truncate_resealed(folder):
    _truncate(folder)
    _reseal(folder)


def _wrong_shape(folder):
    def change(t):
        t["encoder.layer.0.attention.self.query.values"] = t["encoder.layer.0.attention.self.query.values"][:-3].clone()
    _rewrite_tensors(folder, change)


def _wrong_dtype(folder):
    def change(t):
        t["encoder.layer.0.attention.self.query.values"] = t["encoder.layer.0.attention.self.query.values"].float()
    _rewrite_tensors(folder, change)


def _wrong_dense_shape(folder):
    def change(t):
        t["embeddings.LayerNorm.weight"] = torch.ones(7)
    _rewrite_tensors(folder, change)


def _missing_tensor(folder):
    _rewrite_tensors(folder, lambda t: t.pop("encoder.layer.1.output.dense.mask"))


def _nan_tensor(folder):
    def change(t):
        t["embeddings.LayerNorm.weight"] = torch.full_like(t["embeddings.LayerNorm.weight"], float("nan"))
    _rewrite_tensors(folder, change)


def _edit_manifest(edit):
    def damage(folder):
        manifest = json.loads((folder / MANIFEST).read_text())
        edit(manifest)
        (folder / MANIFEST).write_text(json.dumps(manifest))
    return damage


def _manifest_not_json(folder):
    (folder / MANIFEST).write_text('{"format_version": 1, "layers": ')


def _config_broken(folder):
    (folder / "config.json").write_text("{not json")


def _config_resealed_bigger(folder):
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 4096 * 1024  # huge: must be refused before anything is allocated
    (folder / "config.json").write_text(json.dumps(config))
    _reseal(folder)


def _config_resealed_broken(folder):
    (folder / "config.json").write_text("[1, 2")
    _reseal(folder)


def _layer_wrong_format_name(folder):
    _edit_manifest(lambda m: m["layers"]["encoder.layer.0.attention.self.query"].update(format="zip"))(folder)


DAMAGES = [
    ("flipped-byte", _flip, sp.ChecksumError, TENSORS, "sha256"),
    ("truncated", _truncate, sp.ChecksumError, TENSORS, "sha256"),
    ("truncated-resealed", _truncate_resealed, sp.FormatError, TENSORS, "unreadable safetensors"),
    ("tensor-wrong-shape", _wrong_shape, sp.TensorLayoutError, TENSORS, "attention.self.query"),
    ("tensor-wrong-dtype", _wrong_dtype, sp.TensorLayoutError, TENSORS, "attention.self.query"),
    ("dense-tensor-wrong-shape", _wrong_dense_shape, sp.TensorLayoutError, TENSORS, "embeddings.LayerNorm.weight"),
    ("tensor-missing", _missing_tensor, sp.TensorLayoutError, TENSORS, "encoder.layer.1.output.dense"),
    ("nan-in-tensor", _nan_tensor, sp.TensorLayoutError, TENSORS, "NaN"),
    ("newer-version", _edit_manifest(lambda m: m.update(format_version=99)), sp.VersionError, MANIFEST, "newer"),
    ("manifest-names-absent-layer", _edit_manifest(lambda m: m["layers"].update({"encoder.layer.9.ghost": dict(
        m["layers"]["encoder.layer.0.attention.self.query"])})), sp.TensorLayoutError, "", "encoder.layer.9.ghost"),
    ("manifest-unknown-format", _layer_wrong_format_name, sp.TensorLayoutError, MANIFEST, "unknown format"),
    ("manifest-not-json", _manifest_not_json, sp.FormatError, MANIFEST, "unreadable manifest"),
    ("manifest-not-object", lambda f: (f / MANIFEST).write_text("[]"), sp.FormatError, MANIFEST, "not a JSON object"),
    ("manifest-missing", lambda f: (f / MANIFEST).unlink(), sp.FormatError, MANIFEST, "not a sparsepress folder"),
    ("tensors-missing", lambda f: (f / TENSORS).unlink(), sp.FormatError, TENSORS, "missing"),
    ("config-broken", _config_broken, sp.ChecksumError, "config.json", "sha256"),
    ("config-broken-resealed", _config_resealed_broken, sp.FormatError, "config.json", "config"),
    ("config-huge-resealed", _config_resealed_bigger, sp.FormatError, "", "shape"),
]


@pytest.mark.parametrize("damage, error, filename, problem", [pytest.param(*d[1:], id=d[0]) for d in DAMAGES])
def test_damaged_folder_fails_cleanly_in_load_and_inspect(saved, tmp_path, damage, error, filename, problem):
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    damage(folder)
    with pytest.raises(error, match=problem) as caught:
        sp.load(folder)
    assert str(folder / filename) in str(caught.value)
    _assert_clean_failure(_cli("inspect", folder), problem)
    with pytest.raises(error, match=problem):
        verify_folder(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in saved.iterdir() if (folder / p.name).exists())


def test_verify_folder_checks_layouts_without_building(saved, tmp_path):
    assert verify_folder(saved)["model_class"] == "BertModel"
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    _wrong_shape(folder)
    with pytest.raises(sp.TensorLayoutError, match="attention.self.query"):
        verify_folder(folder)


def test_inspect_reports_verified_layers(saved):
    result = _cli("inspect", saved)
    assert result.exit_code == 0 and "layer tensors verified" in result.output


def test_pickle_is_never_loaded(saved, tmp_path, monkeypatch):
    import pickle

    def refuse(*args, **kwargs):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    folder = tmp_path / "m"
    shutil.copytree(saved, folder)
    (folder / "pytorch_model.bin").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    sp.load(folder)
    verify_folder(folder)


# --- poisoned weights ----------------------------------------------------------------------------


def test_nan_weight_via_cli_names_the_layer(tiny_bert_dir, good_recipe, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _model_variant(tmp_path, tiny_bert_dir, "poisoned", weights=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tiny_bert_dir / name, folder / name)
    tensors = load_file(str(tiny_bert_dir / "model.safetensors"))
    key = next(k for k in tensors if "layer.1.attention.self.value.weight" in k)
    tensors[key][3, 5] = float("inf")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "o"
    result = _cli("compress", folder, "--recipe", good_recipe, "--out", out, "--samples", "2", "--seq-len", "16")
    _assert_clean_failure(result, "encoder.layer.1.attention.self.value", "NaN or Inf in weight")
    assert not out.exists()
    result = _cli("compress", folder, "--recipe", good_recipe, "--out", out, "--samples", "2", "--seq-len", "16",
                  "--on-nonfinite", "skip")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "encoder.layer.1.attention.self.value: zeroed 1" in result.output
    loaded = sp.load(out)
    assert loaded.encoder.layer[1].attention.self.value.weight[3, 5] == 0


def test_nonfinite_skip_zeroes_weights_with_a_warning():
    model = tiny_bert()
    with torch.no_grad():
        model.encoder.layer[0].intermediate.dense.weight[0, :4] = float("nan")
    with pytest.warns(sp.NonFiniteWarning, match=r"encoder.layer.0.intermediate.dense: zeroed 4"):
        sp.compress(model, {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}]}, calibration=token_ids(),
                    nonfinite="skip")
    weight = model.encoder.layer[0].intermediate.dense.weight
    assert bool(torch.isfinite(weight).all()) and bool((weight[0, :4] == 0).all())


def _poison_tokens(model, token: int = 7):
    """A finite model whose calibration activations overflow for one token id (weights stay finite)."""
    with torch.no_grad():
        model.embeddings.word_embeddings.weight[token] = float("nan")


def test_nonfinite_calibration_activations(tmp_path):
    ids = token_ids(6)
    ids[2][3] = 7  # sample 2 carries the poisoned token; the others do not
    for sample in (ids[0], ids[1], ids[3], ids[4], ids[5]):
        sample[sample == 7] = 8
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize_embeddings": {"bits": 8}}]}
    model = tiny_bert()
    _poison_tokens(model)
    with pytest.raises(sp.PoisonedWeightError, match=r"encoder.layer.0.attention.self.query: NaN or Inf in calibration"):
        sp.compress(model, recipe, calibration=ids)
    model = tiny_bert()
    _poison_tokens(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sp.compress(model, recipe, calibration=ids, nonfinite="skip")
    messages = [str(w.message) for w in caught if issubclass(w.category, sp.NonFiniteWarning)]
    assert any("encoder.layer.0.attention.self.query: dropped" in m and "calibration tokens" in m for m in messages)
    assert any(m.startswith("embeddings.word_embeddings: zeroed") for m in messages)
    out = sp.save(model, tmp_path / "m")
    verify_folder(out)  # every stored float is finite
    for module in model.modules():
        if isinstance(module, sp.SparseLinear):
            assert bool(torch.isfinite(module.weight).all())


def test_save_refuses_nan_and_writes_nothing(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        model.pooler.dense.bias[0] = float("nan")
    with pytest.raises(sp.FormatError, match="pooler.dense.bias"):
        sp.save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_unknown_nonfinite_policy_is_refused():
    with pytest.raises(sp.InputError, match="nonfinite"):
        sp.compress(tiny_bert(), {"stages": [{"prune": {"sparsity": 0.5}}]}, calibration=token_ids(), nonfinite="ignore")
