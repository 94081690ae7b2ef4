"""The sweep's results: SQLite in WAL mode (one row per trial, committed as each finishes) and results.csv.

SQLite with `synchronous=FULL` survives a killed process or a power cut with every committed row
intact; results.csv (DESIGN section 3 columns first, extra measurements after) is rewritten
atomically from it after every change, so it is never half written either.

Example:
    >>> import tempfile
    >>> from sparsepress.sweep.grid import expand_grid
    >>> grid = expand_grid({"recipe": {"stages": [{"quantize": {}}]}, "vary": {"stages.0.quantize.bits": [8, 4]}})
    >>> store = ResultsStore.create(tempfile.mkdtemp() + "/s", grid, model="m", grid_text="")
    >>> store.record_failure(1, "ValueError: no")
    >>> [(r["trial"], r["status"]) for r in store.rows()]
    [(0, 'pending'), (1, 'failed')]
    >>> open(store.folder / "results.csv").readline().strip()
    'trial,status,recipe,size_bytes,fidelity,latency_ms,error,label,tensors_bytes,perplexity,user_metric,dense_latency_ms,speedup,energy_j,dense_energy_j,energy_source,latency_contended,others_cores,latency_cpu,compress_s,wall_s,attempts,finished'
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from ..errors import InputError
from .grid import Grid

DB_NAME = "sweep.sqlite"
CSV_NAME = "results.csv"
CSV_COLUMNS = (
    "trial",
    "status",
    "recipe",
    "size_bytes",
    "fidelity",
    "latency_ms",
    "error",
    "label",
    "tensors_bytes",
    "perplexity",
    "user_metric",
    "dense_latency_ms",
    "speedup",
    "energy_j",
    "dense_energy_j",
    "energy_source",
    "latency_contended",
    "others_cores",
    "latency_cpu",
    "compress_s",
    "wall_s",
    "attempts",
    "finished",
)
STATUSES = ("pending", "running", "done", "failed")
SCHEMA_VERSION = 1
_ADDED_COLUMNS = (("energy_j", "REAL"), ("dense_energy_j", "REAL"), ("energy_source", "TEXT"))

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    trial INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, label TEXT NOT NULL, recipe TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', size_bytes INTEGER, tensors_bytes INTEGER, fidelity REAL,
    perplexity REAL, user_metric REAL, latency_ms REAL, dense_latency_ms REAL, latency_contended INTEGER,
    others_cores REAL, latency_cpu TEXT, compress_s REAL, wall_s REAL, error TEXT, attempts INTEGER NOT NULL DEFAULT 0,
    started TEXT, finished TEXT, energy_j REAL, dense_energy_j REAL, energy_source TEXT);
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY AUTOINCREMENT, started REAL NOT NULL, ended REAL);
"""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime())


class ResultsStore:
    """One sweep folder's results database; the driver is its only writer."""

    def __init__(self, folder: Path, connection: sqlite3.Connection):
        self.folder, self._db = folder, connection

    @classmethod
    def create(cls, folder: str | Path, grid: Grid, *, model: str, grid_text: str) -> "ResultsStore":
        """A new store with every trial pending; InputError when `folder` already holds anything."""
        folder = Path(folder)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise InputError(
                folder, "exists and is not empty; pass --resume to continue that sweep, or another --out"
            )
        folder.mkdir(parents=True, exist_ok=True)
        store = cls(folder, _connect(folder / DB_NAME))
        with store._db:
            store._db.executemany(
                "INSERT INTO trials (trial, key, label, recipe) VALUES (?, ?, ?, ?)",
                [(t.index, t.key, t.label, t.recipe_json) for t in grid.trials],
            )
            store._set_meta(
                {
                    "schema_version": SCHEMA_VERSION,
                    "model": model,
                    "grid": grid_text,
                    "paths": grid.paths,
                    "settings": grid.settings.model_dump(mode="json"),
                }
            )
        store.export_csv()
        return store

    @classmethod
    def open(
        cls, folder: str | Path, grid: Grid | None = None, *, model: str | None = None
    ) -> "ResultsStore":
        """The store of an existing sweep; with `grid` / `model`, InputError unless they are the sweep's own."""
        folder = Path(folder)
        if not (folder / DB_NAME).is_file():
            raise InputError(folder, f"no {DB_NAME}: not a sweep folder")
        store = cls(folder, _connect(folder / DB_NAME))
        if model is not None and store.meta("model") != model:
            raise InputError(
                folder, f"this sweep is of model {store.meta('model')!r}, not {model!r}; use another --out"
            )
        if grid is not None:
            stored = [row["key"] for row in store.rows()]
            if stored != [t.key for t in grid.trials]:
                raise InputError(
                    folder, "this sweep was made from a different grid (its trials differ); use another --out"
                )
        return store

    def _set_meta(self, values: dict[str, Any]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [(k, json.dumps(v)) for k, v in values.items()],
        )

    def set_meta(self, **values: Any) -> None:
        """Record sweep-wide facts (dense model size, CPU, ...), JSON-encoded."""
        with self._db:
            self._set_meta(values)

    def meta(self, key: str, default: Any = None) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row is not None else default

    def rows(self) -> list[dict[str, Any]]:
        """Every trial as a dict, in trial order."""
        cursor = self._db.execute("SELECT * FROM trials ORDER BY trial")
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, values)) for values in cursor.fetchall()]

    def mark_running(self, trial: int) -> None:
        with self._db:
            self._db.execute(
                "UPDATE trials SET status = 'running', attempts = attempts + 1, started = ?, error = NULL "
                "WHERE trial = ?",
                (_now(), trial),
            )
        self.export_csv()

    def record_outcome(self, trial: int, outcome: Any) -> None:
        """A finished trial's measurements (a `trial.TrialOutcome`); status done."""
        with self._db:
            self._db.execute(
                "UPDATE trials SET status = 'done', size_bytes = ?, tensors_bytes = ?, fidelity = ?, perplexity = ?, "
                "user_metric = ?, compress_s = ?, wall_s = ?, error = NULL, finished = ? WHERE trial = ?",
                (
                    outcome.size_bytes,
                    outcome.tensors_bytes,
                    outcome.fidelity,
                    outcome.perplexity,
                    outcome.user_metric,
                    outcome.compress_s,
                    outcome.wall_s,
                    _now(),
                    trial,
                ),
            )
        self.export_csv()

    def record_failure(self, trial: int, error: str) -> None:
        with self._db:
            self._db.execute(
                "UPDATE trials SET status = 'failed', error = ?, finished = ? WHERE trial = ?",
                (error, _now(), trial),
            )
        self.export_csv()

    def record_latency(self, trial: int, timing: Any) -> None:
        """A `trial.LatencyOutcome` for a done trial."""
        with self._db:
            self._db.execute(
                "UPDATE trials SET latency_ms = ?, dense_latency_ms = ?, latency_contended = ?, others_cores = ?, "
                "latency_cpu = ?, energy_j = ?, dense_energy_j = ?, energy_source = ?, error = NULL WHERE trial = ?",
                (
                    timing.latency_ms,
                    timing.dense_ms,
                    int(timing.contended),
                    timing.others_cores,
                    f"{timing.cpu}, {timing.threads} threads",
                    timing.energy_j,
                    timing.dense_energy_j,
                    timing.energy_source,
                    trial,
                ),
            )
        self.export_csv()

    def record_latency_error(self, trial: int, error: str) -> None:
        """The timing of a done trial failed: kept in `error`, latency left empty (a resume retries it)."""
        with self._db:
            self._db.execute("UPDATE trials SET error = ? WHERE trial = ?", (f"latency: {error}", trial))
        self.export_csv()

    def begin_session(self) -> int:
        with self._db:
            return int(
                self._db.execute("INSERT INTO sessions (started) VALUES (?)", (time.time(),)).lastrowid
            )

    def end_session(self, session: int) -> None:
        with self._db:
            self._db.execute("UPDATE sessions SET ended = ? WHERE id = ?", (time.time(), session))

    def wall_seconds(self) -> float:
        """Wall time of every session of this sweep (an interrupted one counts until its last change)."""
        total = 0.0
        for started, ended in self._db.execute("SELECT started, ended FROM sessions"):
            total += (ended or started) - started
        return total

    def export_csv(self) -> Path:
        """Rewrite results.csv from the database, atomically."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for row in self.rows():
            speedup = (row["dense_latency_ms"] / row["latency_ms"]) if row["latency_ms"] else None
            values = {
                **row,
                "speedup": speedup,
                "latency_contended": None
                if row["latency_contended"] is None
                else bool(row["latency_contended"]),
            }
            writer.writerow(["" if values[c] is None else _csv_value(values[c]) for c in CSV_COLUMNS])
        path = self.folder / CSV_NAME
        tmp = path.with_name(f".{CSV_NAME}.tmp-{os.getpid()}")
        tmp.write_text(buffer.getvalue())
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self._db.close()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.8g}"
    return value


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(str(path), timeout=30.0)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    connection.executescript(_SCHEMA)
    # Sweeps written before a column existed get it (empty) rather than failing to open.
    present = {row[1] for row in connection.execute("PRAGMA table_info(trials)")}
    for name, kind in _ADDED_COLUMNS:
        if name not in present:
            with connection:
                connection.execute(f"ALTER TABLE trials ADD COLUMN {name} {kind}")
    return connection
