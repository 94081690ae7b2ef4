"""`sparsepress sweep` on a local Ray: the whole process group killed mid-sweep (SIGKILL, no clean-up),
then `--resume` finishes it with no trial lost or run twice, and the same numbers as a straight run."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sweep_helpers import CALLS_ENV, calls, tiny_grid_text

from sparsepress.sweep.store import DB_NAME, ResultsStore

pytest.importorskip("ray", reason="sweeps on Ray need the 'dist' extra")

SPARSITIES = ["0.3", "0.4", "0.5", "0.6", "0.7"]


def _command(model, grid, out, *extra):
    return [
        sys.executable,
        "-m",
        "sparsepress.cli",
        "sweep",
        str(model),
        "--grid",
        str(grid),
        "--out",
        str(out),
        *extra,
    ]


def _env(tmp_path):
    tests = str(Path(__file__).resolve().parent)
    return {
        **os.environ,
        CALLS_ENV: str(tmp_path / "calls.jsonl"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }


def _statuses(out):
    try:
        with sqlite3.connect(out / DB_NAME, timeout=5) as db:
            return dict(db.execute("SELECT trial, status FROM trials").fetchall())
    except sqlite3.Error:  # not created yet
        return {}


def test_killed_sweep_resumes_with_no_trial_lost_or_repeated(tiny_bert_dir, tmp_path, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(tiny_grid_text(SPARSITIES, latency=True))
    out = tmp_path / "sweep"
    env = _env(tmp_path)
    process = subprocess.Popen(
        _command(tiny_bert_dir, grid, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while "done" not in _statuses(out).values():
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the driver, Ray's daemons and its workers: a crash
        except ProcessLookupError:  # the sweep already died (the assertion above says why)
            pass
        process.wait()
    killed = ResultsStore.open(out)
    before = {r["trial"]: r for r in killed.rows()}
    killed.close()
    finished_before = {t for t, r in before.items() if r["status"] == "done"}
    assert finished_before and len(finished_before) < len(SPARSITIES), "the kill should land mid-sweep"

    result = subprocess.run(
        _command(tiny_bert_dir, grid, out, "--resume"), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = ResultsStore.open(out)
    after = store.rows()
    store.close()
    assert [r["status"] for r in after] == ["done"] * len(SPARSITIES)
    assert all(r["latency_ms"] > 0 and r["latency_cpu"] for r in after)
    for trial in finished_before:  # untouched by the resume: same row, one attempt
        assert after[trial]["finished"] == before[trial]["finished"] and after[trial]["attempts"] == 1
    # Every trial reached its metric at least once; the finished ones exactly once.
    monkeypatch.setenv(CALLS_ENV, env[CALLS_ENV])
    seen = [c["stages"][0]["prune"]["sparsity"] for c in calls() if "dense" not in c]
    for trial, sparsity in enumerate(SPARSITIES):
        assert (
            seen.count(float(sparsity)) == 1 if trial in finished_before else seen.count(float(sparsity)) >= 1
        )
    with open(out / "results.csv") as handle:
        assert len(handle.read().strip().splitlines()) == 1 + len(SPARSITIES)

    # The same grid straight through, in this process: identical sizes and fidelities (same seed).
    from sparsepress.sweep.driver import run_sweep

    straight = run_sweep(str(tiny_bert_dir), grid, tmp_path / "straight", address="inline", latency=False)
    for got, want in zip(after, straight.rows()):
        assert (got["size_bytes"], got["fidelity"], got["recipe"]) == (
            want["size_bytes"],
            want["fidelity"],
            want["recipe"],
        )
    straight.close()
