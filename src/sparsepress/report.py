"""Rich tables for inspect, eval, bench and demo; sizes measured from the files on disk.

Example:
    >>> human_bytes(1536)
    '1.5 KiB'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def human_bytes(count: float) -> str:
    """Bytes in binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GiB"


def folder_bytes(folder: str | Path) -> int:
    """What `ls -l` of every file under `folder` adds up to.

    Example:
        >>> import tempfile; d = tempfile.mkdtemp(); _ = open(d + "/a", "wb").write(b"abc")
        >>> folder_bytes(d)
        3
    """
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def dense_weights_bytes(model_folder: str | Path) -> int:
    """Size of a Hugging Face folder's weight files (model*.safetensors)."""
    return sum(p.stat().st_size for p in Path(model_folder).glob("model*.safetensors"))


def layer_table(manifest: dict[str, Any], title: str = "layers") -> Table:
    """One row per packed layer: shape, pattern, sparsity, format, dtype, bytes; totals last."""
    table = Table(title=title, show_lines=False)
    for column in ("layer", "shape", "pattern", "sparsity", "format", "dtype", "bytes"):
        table.add_column(column, justify="right" if column in ("sparsity", "bytes") else "left")
    total_bytes = total_weights = total_zeros = 0
    for name, meta in manifest["layers"].items():
        rows, cols = meta["shape"]
        nbytes = int(meta.get("nbytes", 0))
        total_bytes += nbytes
        total_weights += rows * cols
        total_zeros += meta.get("sparsity", 0.0) * rows * cols
        table.add_row(name, f"{rows}x{cols}", str(meta.get("pattern") or "-"), f"{meta.get('sparsity', 0.0):.1%}",
                      meta["format"] if meta["format"] != "elastic" else f"elastic/{meta.get('base')}",
                      meta["dtype"], human_bytes(nbytes))
    for name, meta in manifest.get("embeddings", {}).items():
        rows, cols = meta["shape"]
        table.add_row(name, f"{rows}x{cols}", "-", "-", "rows", f"int{meta['bits']}", "")
    if total_weights:
        table.add_row("[bold]total (Linear)", "", "", f"[bold]{total_zeros / total_weights:.1%}", "", "",
                      f"[bold]{human_bytes(total_bytes)}")
    return table


def level_table(manifest: dict[str, Any]) -> Table | None:
    """Elastic folders: one row per stored level (sparsity of the Linear layers, values and masks they run).

    Example:
        >>> level_table({"layers": {}}) is None
        True
    """
    levels = (manifest.get("elastic") or {}).get("levels")
    if not levels:
        return None
    table = Table(title="elastic sparsity levels (sp.load(dir, sparsity=...), sp.set_sparsity)")
    for column in ("level", "Linear sparsity", "kept weights", "default"):
        table.add_column(column, justify="right")
    elastic = [m for m in manifest["layers"].values() if m.get("format") == "elastic"]
    total = sum(m["shape"][0] * m["shape"][1] for m in elastic) or 1
    for index, level in enumerate(levels):
        zeros = sum(m["level_sparsity"][index] * m["shape"][0] * m["shape"][1] for m in elastic)
        table.add_row(f"{level:g}", f"{zeros / total:.1%}", f"{int(total - zeros):,}", "yes" if index == 0 else "")
    return table


def budget_tables(manifest: dict[str, Any]) -> list[Table]:
    """Folders made to a budget: targets against predicted and achieved figures, and the allocation chosen.

    Example:
        >>> budget_tables({})
        []
    """
    budget = manifest.get("budget")
    if not budget:
        return []
    targets, achieved, predicted = budget.get("target", {}), budget.get("achieved") or {}, budget.get("predicted") or {}
    table = Table(title="budget")
    for column in ("target", "asked", "predicted", "achieved", "met"):
        table.add_column(column, justify="right" if column != "target" else "left")
    checks = (("size_mb", "size MB", lambda got, asked: got <= asked),
              ("latency_ms", f"latency ms (batch {targets.get('batch', 1)} x {targets.get('seq_len', 128)})",
               lambda got, asked: got <= asked),
              ("min_fidelity", "fidelity", lambda got, asked: got >= asked))
    names = {"size_mb": "size_mb", "latency_ms": "latency_ms", "min_fidelity": "fidelity"}
    for key, label, ok in checks:
        if key not in targets:
            continue
        got, guess = achieved.get(names[key]), predicted.get(names[key])
        table.add_row(label, f"{targets[key]:g}", "-" if guess is None else f"{guess:.4g}",
                      "-" if got is None else f"{got:.4g}", "-" if got is None else ("yes" if ok(got, targets[key]) else "NO"))
    choices = Table(title="allocation")
    choices.add_column("layer or table")
    choices.add_column("choice")
    for name, choice in {**budget.get("layers", {}), **budget.get("embeddings", {})}.items():
        choices.add_row(name, choice)
    return [table, choices]


def extra_tables(manifest: dict[str, Any]) -> list[Table]:
    """The elastic-level and budget tables a folder has (inspect and compress print them).

    Example:
        >>> extra_tables({"layers": {}})
        []
    """
    levels = level_table(manifest)
    return ([levels] if levels is not None else []) + budget_tables(manifest)


def kv_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A two-column table of labelled values."""
    table = Table(title=title)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key, value in rows:
        table.add_row(key, value)
    return table


def latency_table(title: str, rows: list[tuple[str, float]], baselines: tuple[str, ...]) -> Table:
    """Latency rows with the speedup of each over every one of `baselines`, measured in one process.

    Example:
        >>> latency_table("t", [("a", 2.0), ("b", 1.0)], baselines=("a",)).row_count
        2
    """
    table = Table(title=title)
    table.add_column("model")
    table.add_column("ms", justify="right")
    for baseline in baselines:
        table.add_column(f"speedup vs {baseline}", justify="right")
    times = dict(rows)
    for name, ms in rows:
        table.add_row(name, f"{ms:.2f}", *(f"{times[b] / ms:.2f}x" for b in baselines))
    return table
