"""The `sweep` and `report` commands (DESIGN section 2), registered on the typer app by `sparsepress.cli`.

Example:
    >>> from typer.testing import CliRunner
    >>> from sparsepress.cli import app
    >>> "--grid" in CliRunner().invoke(app, ["sweep", "--help"]).output
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import InputError


def sweep_command(
    model: str = typer.Argument(
        ..., help="Hugging Face model folder, or 'minilm' for the bundled all-MiniLM-L6-v2"
    ),
    grid: Path = typer.Option(
        ..., "--grid", "-g", help="grid YAML: a base recipe, dotted paths to vary, settings"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="sweep folder: results.csv, sweep.sqlite, trials/NNN/"),
    address: Optional[str] = typer.Option(
        None,
        "--address",
        help="Ray cluster address (default: start a local Ray on "
        "this machine's CPUs; 'inline': no Ray, one trial at a time here)",
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted sweep: finished trials and timings are kept"
    ),
    latency: bool = typer.Option(
        True,
        "--latency/--no-latency",
        help="time finished trials (--no-latency leaves it to a later --resume)",
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="with --resume, run failed trials again"),
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="calibration text file (default: bundled WikiText-2 sample)"
    ),
    text: Optional[Path] = typer.Option(
        None, "--text", help="held-out text file (default: bundled WikiText-2 test sample)"
    ),
) -> None:
    """Compress MODEL with every recipe of a grid (Ray tasks), evaluate and time each; SWEEP/results.csv."""
    from ..cli import console
    from .driver import run_sweep
    from .store import CSV_NAME

    try:
        store = run_sweep(
            model,
            grid,
            out,
            address=address,
            resume=resume,
            latency=latency,
            retry_failed=retry_failed,
            calibration=calibration,
            text=text,
            console=console,
        )
    except KeyboardInterrupt:
        console.print(
            f"[yellow]interrupted[/yellow]: finished trials are kept in {out}; rerun with --resume to continue",
            highlight=False,
        )
        raise typer.Exit(130) from None
    rows = store.rows()
    failed = sum(1 for r in rows if r["status"] == "failed")
    console.print(
        f"{len(rows)} trials ({failed} failed) in {store.wall_seconds():.0f} s of wall time; "
        f"results in {out / CSV_NAME}",
        highlight=False,
    )
    store.close()


def report_command(
    target: Path = typer.Argument(
        ..., help="a sweep folder (from `sparsepress sweep`) or a packed model folder"
    ),
    out: Path = typer.Option(..., "--out", "-o", help="report folder: index.html and PNG figures"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
) -> None:
    """An HTML report with PNG figures: Pareto fronts, per-layer sparsity / bits, size breakdown, sensitivity."""
    from ..cli import console
    from .page import write_report

    if not target.exists():
        raise InputError(target, "not found; expected a sweep folder or a sparsepress model folder")
    index = write_report(target, out, overwrite=overwrite)
    console.print(f"report written: {index}", highlight=False)
