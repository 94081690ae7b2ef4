"""The `export` and `generate` commands (registered on the CLI app by `register`).

Example:
    >>> sorted(EXPORTERS)
    ['compressed-tensors', 'hf', 'onnx']
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import InputError


def _export_hf(model: Any, staging: Path, folder: Path, manifest: dict[str, Any], options: dict[str, Any]) -> list[str]:
    from .hf.export import export_hf

    measured = export_hf(model, staging, folder, manifest)
    return [f"{name}: {value:.4f}" for name, value in measured.items()]


def _export_compressed_tensors(model: Any, staging: Path, folder: Path, manifest: dict[str, Any], options: dict[str, Any]) -> list[str]:
    from .compressed_tensors.write import export_compressed_tensors

    lost = export_compressed_tensors(model, staging, folder)
    for line in lost:
        warnings.warn(f"not kept in the compressed-tensors layout: {line}", stacklevel=2)
    return [f"not kept: {line}" for line in lost] or ["every layer kept exactly"]


def _export_onnx(model: Any, staging: Path, folder: Path, manifest: dict[str, Any], options: dict[str, Any]) -> list[str]:
    from ..io import _copy_side_files
    from .onnx import export_onnx

    report = export_onnx(model, staging, dtype=options["dtype"])
    _copy_side_files(folder, staging)
    if (folder / "config.json").is_file():
        shutil.copy2(folder / "config.json", staging / "config.json")
    return [f"{name}: mean cosine to the packed model {score:.5f}" for name, score in report["agreement"].items()]


# --to value -> handler(model, staging folder, source folder, manifest, options) -> report lines
EXPORTERS: dict[str, Callable[..., list[str]]] = {
    "hf": _export_hf, "onnx": _export_onnx, "compressed-tensors": _export_compressed_tensors,
}


def export_folder(folder: Path, to: str, out: Path, *, overwrite: bool = False, dtype: str = "fp32") -> list[str]:
    """Export a sparsepress (or compressed-tensors) folder to another format, atomically; report lines."""
    from ..io import _atomic_folder, _replace_folder, load, read_manifest

    if to not in EXPORTERS:
        raise InputError("--to", f"got {to!r}; allowed: {' | '.join(EXPORTERS)}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    model = load(folder)
    staging = _atomic_folder(Path(out), overwrite)
    try:
        lines = EXPORTERS[to](model, staging, folder, manifest, {"dtype": dtype})
        _replace_folder(staging, Path(out))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return lines


def register(app: typer.Typer, clean_errors: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Add `export` and `generate` to the CLI `app` (wrapped by the CLI's error handler)."""

    @app.command("export")
    @clean_errors
    def export_command(
        folder: Path = typer.Argument(..., help="a sparsepress (or compressed-tensors) model folder"),
        to: str = typer.Option(..., "--to", help="hf | onnx | compressed-tensors"),
        out: Path = typer.Option(..., "--out", "-o", help="output folder"),
        dtype: str = typer.Option("fp32", "--dtype", help="onnx only: fp32 | int8 (adds ONNX Runtime dynamic int8)"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    ) -> None:
        """Export FOLDER as a plain transformers folder, an ONNX graph or a compressed-tensors folder."""
        from ..cli import console, errors

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lines = export_folder(folder, to, out, overwrite=overwrite, dtype=dtype)
        for item in caught:
            if "not kept" in str(item.message):
                errors.print(f"[yellow]warning:[/yellow] {item.message}", highlight=False)
        console.print(f"wrote {out} ({to})")
        for line in lines:
            console.print(f"  {line}", highlight=False)

    @app.command("generate")
    @clean_errors
    def generate_command(
        folder: Path = typer.Argument(..., help="a sparsepress (or compressed-tensors) causal LM folder"),
        prompt: str = typer.Option(..., "--prompt", "-p", help="text to continue"),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
        reference: Optional[str] = typer.Option(None, "--reference", help="dense model to time against (default: the recorded source)"),
        decoder: str = typer.Option("transformers", "--decoder", help="decode loop (see sparsepress.interop.generate.DECODERS)"),
        no_reference: bool = typer.Option(False, "--no-reference", help="skip the dense timing"),
    ) -> None:
        """Stream a greedy continuation of PROMPT (KV cache), then tokens/s against the dense source."""
        from ..cli import console
        from .generate import DECODERS, run_generate

        if decoder not in DECODERS:
            raise InputError("--decoder", f"got {decoder!r}; allowed: {' | '.join(DECODERS)}")
        run_generate(Path(folder), prompt, max_new_tokens, DECODERS[decoder], reference, not no_reference, console)
