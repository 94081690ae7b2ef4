"""Sweeps run in this process (the `inline` runner): every trial recorded as it finishes, failures kept
with their error, interrupted sweeps resumed with no finished trial run twice, identical results."""

from __future__ import annotations

import csv
import json
import sqlite3

import pytest
from sweep_helpers import CALLS_ENV, calls, tiny_grid_text

import sparsepress as sp
from sparsepress.errors import GridError, InputError
from sparsepress.report import folder_bytes
from sparsepress.sweep.driver import run_sweep, trial_folder
from sparsepress.sweep.store import CSV_COLUMNS, DB_NAME, ResultsStore


@pytest.fixture
def call_log(tmp_path, monkeypatch):
    path = tmp_path / "calls.jsonl"
    monkeypatch.setenv(CALLS_ENV, str(path))
    return path


def _grid(tmp_path, text, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _sweep(model, grid, out, **kwargs):
    store = run_sweep(str(model), grid, out, address="inline", **kwargs)
    rows = store.rows()
    store.close()
    return rows


def _trial_calls():
    return [c for c in calls() if "dense" not in c]


def test_trials_are_recorded_and_a_failing_one_is_kept_with_its_error(tiny_bert_dir, tmp_path, call_log):
    grid = _grid(tmp_path, tiny_grid_text(["0.5", "0.7"], targets='[[".*"], ["no_such_layer"]]'))
    rows = _sweep(tiny_bert_dir, grid, tmp_path / "sweep")
    assert [r["status"] for r in rows] == ["done", "failed", "done", "failed"]
    for row in rows:
        if row["status"] == "failed":
            assert (
                "RecipeError" in row["error"]
                and "targets" in row["error"]
                and "no_such_layer" in row["error"]
            )
            assert row["size_bytes"] is None and not trial_folder(tmp_path / "sweep", row["trial"]).exists()
            continue
        folder = trial_folder(tmp_path / "sweep", row["trial"])
        assert row["size_bytes"] == folder_bytes(folder)  # du-honest: the stored folder, every file
        assert 0.5 < row["fidelity"] <= 1.0001 and row["error"] is None
        assert row["user_metric"] == pytest.approx(
            json.loads(row["recipe"])["stages"][0]["prune"]["sparsity"], abs=0.02
        )
        assert row["latency_ms"] > 0 and row["dense_latency_ms"] > 0 and row["latency_contended"] in (0, 1)
        assert row["energy_j"] > 0 and row["dense_energy_j"] > 0 and row["energy_source"] in ("rapl", "estimate")
        model = sp.load(folder)
        assert json.loads(row["recipe"]) == model.sparsepress_manifest["recipe"]
        assert model.sparsepress_manifest["source"] == str(tiny_bert_dir)
    with open(tmp_path / "sweep" / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == CSV_COLUMNS and CSV_COLUMNS[:7] == (
        "trial",
        "status",
        "recipe",
        "size_bytes",
        "fidelity",
        "latency_ms",
        "error",
    )
    assert [(t["trial"], t["status"]) for t in table] == [
        ("0", "done"),
        ("1", "failed"),
        ("2", "done"),
        ("3", "failed"),
    ]
    assert json.loads(table[1]["recipe"])["stages"][0]["prune"]["targets"] == ["no_such_layer"]
    journal = sqlite3.connect(tmp_path / "sweep" / DB_NAME).execute("PRAGMA journal_mode").fetchone()[0]
    assert journal == "wal"
    assert len(_trial_calls()) == 2  # the failing trials never reached the metric


def test_interrupted_sweep_resumes_without_losing_or_repeating_a_trial(tiny_bert_dir, tmp_path, call_log):
    reference = _sweep(
        tiny_bert_dir,
        _grid(tmp_path, tiny_grid_text(["0.3", "0.5", "0.7"], latency=False), "ref.yaml"),
        tmp_path / "reference",
    )
    call_log.unlink()
    grid = _grid(
        tmp_path, tiny_grid_text(["0.3", "0.5", "0.7"], metric="interrupt_second_call", latency=False)
    )
    with pytest.raises(KeyboardInterrupt):
        _sweep(tiny_bert_dir, grid, tmp_path / "sweep")
    store = ResultsStore.open(tmp_path / "sweep")
    before = store.rows()
    store.close()
    assert [r["status"] for r in before] == ["done", "running", "pending"]
    assert [c["stages"][0]["prune"]["sparsity"] for c in _trial_calls()] == [0.3, 0.5]

    after = _sweep(tiny_bert_dir, grid, tmp_path / "sweep", resume=True)
    assert [r["status"] for r in after] == ["done", "done", "done"]
    # Trial 0 finished before the interruption: not run again, its row untouched.
    assert [c["stages"][0]["prune"]["sparsity"] for c in _trial_calls()] == [0.3, 0.5, 0.5, 0.7]
    assert after[0]["finished"] == before[0]["finished"] and after[0]["attempts"] == 1
    assert [r["attempts"] for r in after] == [1, 2, 1]
    # Same seed, same numbers as the sweep that ran straight through.
    for got, want in zip(after, reference):
        assert (got["size_bytes"], got["fidelity"], got["recipe"]) == (
            want["size_bytes"],
            want["fidelity"],
            want["recipe"],
        )
    # Nothing left to do: a second resume changes nothing.
    again = _sweep(tiny_bert_dir, grid, tmp_path / "sweep", resume=True)
    assert again == after


def test_timing_can_wait_for_a_later_resume(tiny_bert_dir, tmp_path, call_log):
    grid = _grid(tmp_path, tiny_grid_text(["0.5"]))
    rows = _sweep(tiny_bert_dir, grid, tmp_path / "sweep", latency=False)
    assert rows[0]["status"] == "done" and rows[0]["latency_ms"] is None
    rows = _sweep(tiny_bert_dir, grid, tmp_path / "sweep", resume=True)
    assert rows[0]["latency_ms"] > 0 and rows[0]["latency_cpu"]
    assert len(_trial_calls()) == 1  # timing loaded the stored folder; nothing was compressed again


def test_failed_trials_rerun_only_when_asked(tiny_bert_dir, tmp_path, call_log):
    grid = _grid(tmp_path, tiny_grid_text(["0.5"], targets='[["no_such_layer"]]', latency=False))
    assert _sweep(tiny_bert_dir, grid, tmp_path / "sweep")[0]["status"] == "failed"
    assert _sweep(tiny_bert_dir, grid, tmp_path / "sweep", resume=True)[0]["attempts"] == 1
    rows = _sweep(tiny_bert_dir, grid, tmp_path / "sweep", resume=True, retry_failed=True)
    assert rows[0]["status"] == "failed" and rows[0]["attempts"] == 2


def test_sweep_folders_are_never_mixed_up(tiny_bert_dir, tmp_path, call_log):
    grid = _grid(tmp_path, tiny_grid_text(["0.5"], latency=False))
    _sweep(tiny_bert_dir, grid, tmp_path / "sweep")
    with pytest.raises(InputError, match="not empty"):
        _sweep(tiny_bert_dir, grid, tmp_path / "sweep")
    other = _grid(tmp_path, tiny_grid_text(["0.6"], latency=False), "other.yaml")
    with pytest.raises(InputError, match="different grid"):
        _sweep(tiny_bert_dir, other, tmp_path / "sweep", resume=True)
    with pytest.raises(InputError, match="of model"):
        _sweep("minilm", grid, tmp_path / "sweep", resume=True)


def test_a_user_metric_that_fails_on_the_dense_model_stops_the_sweep_first(tiny_bert_dir, tmp_path):
    grid = _grid(tmp_path, tiny_grid_text(["0.5"], metric="record_call"))
    with pytest.raises(
        GridError, match="settings.user_metric"
    ):  # $CALLS_ENV unset: the metric raises KeyError
        _sweep(tiny_bert_dir, grid, tmp_path / "sweep")


def test_causal_lm_trials_record_perplexity_beside_the_dense_one(tmp_path, monkeypatch):
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "tiny-llama"
    if not (fixture / "model.safetensors").is_file():
        pytest.skip("tests/fixtures/tiny-llama is missing")
    monkeypatch.setenv(CALLS_ENV, str(tmp_path / "calls.jsonl"))
    grid = _grid(tmp_path, tiny_grid_text(["0.5"], metric=None, latency=False))
    rows = _sweep(fixture, grid, tmp_path / "sweep")
    store = ResultsStore.open(tmp_path / "sweep")
    dense = store.meta("dense_perplexity")
    store.close()
    assert rows[0]["status"] == "done" and dense > 1.0
    assert dense < rows[0]["perplexity"] < 3 * dense  # worse than dense, but still a language model
