"""The live view of a sweep: a rich table of trials (running, done, failed) and the best so far.

On a terminal it redraws in place; piped or captured, it prints one line per finished trial and the
table once at the end, so logs stay readable.

Example:
    >>> import io
    >>> from rich.console import Console
    >>> rows = [{"trial": 0, "label": "bits=8", "status": "done", "size_bytes": 2_000_000, "fidelity": 0.99,
    ...          "latency_ms": None, "error": None, "wall_s": 3.0, "started": None}]
    >>> console = Console(record=True, width=120, file=io.StringIO())
    >>> console.print(trials_table(rows, phase="trials"))
    >>> "best fidelity: #0" in console.export_text()
    True
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..report import human_bytes
from .pareto import pareto_front

MAX_ROWS = 24
STYLES = {"done": "green", "failed": "red", "running": "yellow", "pending": "dim"}


def summary_line(rows: list[dict[str, Any]], phase: str) -> Text:
    """Counts by status and the best trials so far (highest fidelity; smallest on the size front)."""
    counts = {status: sum(1 for r in rows if r["status"] == status) for status in STYLES}
    text = Text(f"{phase}: ")
    text.append(", ".join(f"{counts[s]} {s}" for s in ("done", "running", "failed", "pending")))
    done = [r for r in rows if r["status"] == "done" and r["fidelity"] is not None]
    if done:
        best = max(done, key=lambda r: (r["fidelity"], -r["size_bytes"]))
        text.append(
            f"  best fidelity: #{best['trial']} {best['fidelity']:.4f} at {human_bytes(best['size_bytes'])}",
            style="bold",
        )
        front = pareto_front([(r["size_bytes"], r["fidelity"]) for r in done])
        smallest = done[front[0]]
        text.append(
            f"  smallest on the front: #{smallest['trial']} {human_bytes(smallest['size_bytes'])} "
            f"at {smallest['fidelity']:.4f}"
        )
    return text


def trials_table(rows: list[dict[str, Any]], phase: str) -> Group:
    """The summary line over a table of the running trials, then the latest finished ones."""
    table = Table(show_lines=False, expand=False)
    for column, justify in (
        ("#", "right"),
        ("trial", "left"),
        ("status", "left"),
        ("size", "right"),
        ("fidelity", "right"),
        ("latency ms", "right"),
        ("time s", "right"),
        ("note", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in _visible(rows):
        status = row["status"]
        table.add_row(
            str(row["trial"]),
            row["label"],
            Text(status, style=STYLES.get(status, "")),
            human_bytes(row["size_bytes"]) if row["size_bytes"] else "",
            f"{row['fidelity']:.4f}" if row["fidelity"] is not None else "",
            f"{row['latency_ms']:.2f}" if row.get("latency_ms") else "",
            f"{row['wall_s']:.0f}" if row.get("wall_s") else "",
            _note(row),
        )
    return Group(summary_line(rows, phase), table)


def _note(row: dict[str, Any]) -> Text:
    if row.get("error"):
        return Text(row["error"][:60], style="red")
    if row.get("latency_contended"):
        return Text("timed under contention", style="yellow")
    return Text("")


def _visible(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """All rows when few; else the running ones and the most recently finished, in trial order."""
    if len(rows) <= MAX_ROWS:
        return rows
    running = [r for r in rows if r["status"] == "running"]
    finished = sorted(
        (r for r in rows if r["status"] in ("done", "failed")), key=lambda r: r.get("finished") or ""
    )
    keep = {r["trial"] for r in running} | {r["trial"] for r in finished[-(MAX_ROWS - len(running)) :]}
    return [r for r in rows if r["trial"] in keep]


class SweepView:
    """Context manager showing the sweep: `update(rows, phase)` after every change, `event(text)` for log lines."""

    def __init__(self, console: Console):
        self.console = console
        self._live: Live | None = None
        self._rows: list[dict[str, Any]] = []
        self._phase = "trials"

    def __enter__(self) -> "SweepView":
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def update(self, rows: list[dict[str, Any]], phase: str) -> None:
        self._rows, self._phase = rows, phase
        if self._live is not None:
            self._live.update(trials_table(rows, phase))

    def event(self, text: str) -> None:
        """A line for logs (non-terminal output); the live table already shows it on a terminal."""
        if self._live is None:
            self.console.print(text, highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(trials_table(self._rows, self._phase))
            self._live.__exit__(None, None, None)
        elif self._rows:
            self.console.print(trials_table(self._rows, self._phase))
