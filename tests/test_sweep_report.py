"""`sparsepress report`: the page opened in headless Chromium shows every figure (natural size > 0) and
a Pareto table listing every trial; the same facts are checked from the HTML text everywhere."""

from __future__ import annotations

import json
import shutil

import pytest
from browser import chromium, inspect_in_chromium, inspect_statically
from sweep_helpers import CALLS_ENV, tiny_grid_text
from typer.testing import CliRunner

from sparsepress.cli import app
from sparsepress.errors import FormatError, InputError
from sparsepress.sweep.driver import run_sweep, trial_folder
from sparsepress.sweep.page import PARETO_TABLE_ID, write_report

pytest.importorskip("matplotlib", reason="report figures need the 'plot' extra")

SWEEP_FIGURES = {
    "fig-pareto-size",
    "fig-pareto-latency",
    "fig-pareto-user-metric",
    "fig-sparsity-heatmap",
    "fig-bits-heatmap",
    "fig-size-breakdown",
}
SENSITIVITY = {
    "metric": "fidelity loss",
    "curves": [
        {
            "layer": f"encoder.layer.{i}.output.dense",
            "option": option,
            "x": "sparsity",
            "points": [[0.3, 0.001 * (i + 1)], [0.5, 0.004 * (i + 1)], [0.7, 0.02 * (i + 1)]],
            "chosen": 0.5,
        }
        for i in range(2)
        for option in ("unstructured int8", "2:4 int8")
    ],
}


@pytest.fixture(scope="module")
def sweep_dir(tiny_bert_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report-sweep")
    grid = folder / "grid.yaml"
    grid.write_text(tiny_grid_text(["0.5", "0.7"], targets='[[".*"], ["no_such_layer"]]'))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CALLS_ENV, str(folder / "calls.jsonl"))
        run_sweep(str(tiny_bert_dir), grid, folder / "sweep", address="inline").close()
    # One trial as a budgeted compression would leave it: its manifest carries budget and sensitivity.
    manifest_path = trial_folder(folder / "sweep", 0) / "sparsepress.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(
        budget={"target": {"size_mb": 9.0}, "achieved": {"size_mb": 8.6}}, sensitivity=SENSITIVITY
    )
    manifest_path.write_text(json.dumps(manifest))
    return folder / "sweep"


def _views(index):
    """The page's facts from Chromium where it is installed, and from the HTML text always."""
    views = [inspect_statically(index)]
    if chromium() is not None:
        views.append(inspect_in_chromium(index))
    return views


def test_sweep_report_in_the_browser(sweep_dir, tmp_path):
    index = write_report(sweep_dir, tmp_path / "report")
    assert index.name == "index.html"
    for facts in _views(index):
        figures = {image["id"] for image in facts["images"]}
        assert SWEEP_FIGURES | {"fig-sensitivity-000"} <= figures
        for image in facts["images"]:
            assert image["complete"] and image["width"] > 0 and image["height"] > 0, image
        # The Pareto table lists the dense model and every trial, failed ones included.
        assert facts["rows"][PARETO_TABLE_ID] == ["dense", "0", "1", "2", "3"]
    html = index.read_text()
    assert "no_such_layer" in html and "RecipeError" in html  # failed trials show their error
    assert "http://" not in html and "https://" not in html  # self-contained: nothing fetched
    for name in (
        "pareto-size",
        "pareto-latency",
        "sparsity-heatmap",
        "bits-heatmap",
        "size-breakdown",
        "sensitivity-000",
    ):
        assert (tmp_path / "report" / f"{name}.png").stat().st_size > 1000


def test_single_folder_report_shows_layers_breakdown_and_sensitivity(sweep_dir, tmp_path):
    folder = trial_folder(sweep_dir, 0)
    index = write_report(folder, tmp_path / "report")
    manifest = json.loads((folder / "sparsepress.json").read_text())
    for facts in _views(index):
        assert {image["id"] for image in facts["images"]} == {
            "fig-layers",
            "fig-size-breakdown",
            "fig-sensitivity",
        }
        assert all(image["width"] > 0 for image in facts["images"])
        assert facts["rows"]["layer-table"] == list(manifest["layers"]) + list(manifest["embeddings"])
    assert "size_mb" in index.read_text()


def test_a_folder_without_budget_leaves_the_section_out(sweep_dir, tmp_path):
    index = write_report(trial_folder(sweep_dir, 2), tmp_path / "report")
    assert {image["id"] for image in inspect_statically(index)["images"]} == {
        "fig-layers",
        "fig-size-breakdown",
    }
    assert "Budget and sensitivity" not in index.read_text()


def test_malformed_sensitivity_names_the_file(sweep_dir, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(trial_folder(sweep_dir, 2), folder)
    manifest = json.loads((folder / "sparsepress.json").read_text())
    manifest["sensitivity"] = {"curves": [{"layer": "x"}]}
    (folder / "sparsepress.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match=r"sensitivity.curves\[0\]"):
        write_report(folder, tmp_path / "report")
    assert not (tmp_path / "report").exists()  # nothing half written


def test_report_command(sweep_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(sweep_dir), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "index.html").is_file()
    again = runner.invoke(app, ["report", str(sweep_dir), "--out", str(tmp_path / "r")])
    assert again.exit_code == 1 and "not empty" in again.output
    assert (
        runner.invoke(app, ["report", str(sweep_dir), "--out", str(tmp_path / "r"), "--overwrite"]).exit_code
        == 0
    )
    missing = runner.invoke(app, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "nope" in missing.output and "Traceback" not in missing.output
    with pytest.raises(InputError, match="neither a sweep folder"):
        write_report(tmp_path, tmp_path / "y")
