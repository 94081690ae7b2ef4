"""The command line: compress / inspect / eval / bench on a tiny model; errors are one line, no traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sparsepress.cli import app

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, tiny_bert_dir, tiny_recipe_file):
    out = tmp_path_factory.mktemp("cli") / "out"
    result = _invoke("compress", tiny_bert_dir, "--recipe", tiny_recipe_file, "--out", out, "--samples", "8", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    assert "of the dense file" in result.output
    return out


def test_compress_writes_a_loadable_folder(compressed_dir):
    import sparsepress as sp

    manifest = json.loads((compressed_dir / "sparsepress.json").read_text())
    assert manifest["recipe"]["stages"][0]["prune"]["method"] == "wanda"
    assert (compressed_dir / "tokenizer.json").is_file() and (compressed_dir / "config.json").is_file()
    sp.load(compressed_dir)


def test_inspect_lists_layers(compressed_dir):
    result = _invoke("inspect", compressed_dir)
    assert result.exit_code == 0
    assert "encoder.layer.0.attention.self.query" in result.output and "sha256 verified" in result.output


def test_eval_reports_fidelity(compressed_dir):
    result = _invoke("eval", compressed_dir, "--samples", "4", "--seq-len", "32")
    assert result.exit_code == 0, result.output
    value = float(result.output.split("fidelity")[1].split()[1])
    assert 0.0 < value <= 1.0001


def test_bench_shows_baselines_side_by_side(compressed_dir):
    result = _invoke("bench", compressed_dir, "--repeats", "2", "--seq-len", "8")
    assert result.exit_code == 0, result.output
    for row in ("torch fp32 (dense)", "torch dynamic int8 (dense)", "sparsepress"):
        assert row in result.output
    energy = result.output.split("energy per inference")[1]
    assert energy.count(" J (") == 3  # one reading per runtime, each labelled rapl or estimate
    assert ("estimate" in energy) or ("rapl" in energy)


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["compress", "/no/such/model", "--recipe", "RECIPE", "--out", "OUT"], "/no/such/model"),
        (["compress", "MODEL", "--recipe", "/no/such.yaml", "--out", "OUT"], "/no/such.yaml"),
        (["compress", "MODEL", "--recipe", "RECIPE", "--out", "OUT", "--calibration", "/no/calib.txt"], "/no/calib.txt"),
        (["inspect", "/no/such/folder"], "/no/such/folder"),
    ],
)
def test_user_errors_name_the_culprit_and_exit_nonzero(args, culprit, tiny_bert_dir, tiny_recipe_file, tmp_path):
    subst = {"MODEL": tiny_bert_dir, "RECIPE": tiny_recipe_file, "OUT": tmp_path / "o"}
    result = runner.invoke(app, [str(subst.get(a, a)) for a in args])
    assert result.exit_code == 1
    assert culprit in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_bad_recipe_names_field_and_line(tiny_bert_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("stages:\n  - prune:\n      method: lottery\n      sparsity: 0.5\n")
    result = runner.invoke(app, ["compress", str(tiny_bert_dir), "--recipe", str(recipe), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    assert "stages[0].prune.method" in result.output and "line 3" in result.output and "sparsegpt" in result.output
    assert not (tmp_path / "o").exists()


def test_non_empty_out_is_refused_without_overwrite(tiny_bert_dir, tiny_recipe_file, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = runner.invoke(app, ["compress", str(tiny_bert_dir), "--recipe", str(tiny_recipe_file), "--out", str(out)])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "x"
