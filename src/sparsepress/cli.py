"""The `sparsepress` command line (DESIGN section 2): compress, inspect, eval, bench, demo, sweep, report, export,
generate.

Example:
    >>> from typer.testing import CliRunner
    >>> CliRunner().invoke(app, ["--help"]).exit_code
    0
"""

from __future__ import annotations

import functools
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .errors import InputError, SparsepressError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress trained models with sparsity + quantization; store them small; run them fast on CPUs.")
# Piped or captured output gets wide tables rather than names cut at 80 columns.
_WIDTH = None if sys.stdout.isatty() else 200
console = Console(width=_WIDTH)
errors = Console(stderr=True, width=_WIDTH)

DEMO_OUT = Path("sparsepress-demo")


def _clean_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn errors a user can cause into one red line and exit 1; Ctrl-C into exit 130."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except SparsepressError as exc:
            errors.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            errors.print("[yellow]interrupted[/yellow]: no output folder was written", highlight=False)
            raise typer.Exit(130) from None
    return wrapper


def _progress() -> tuple[Progress, Callable[[str, int, int], None]]:
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=False)
    tasks: dict[str, Any] = {}

    def update(what: str, done: int, total: int) -> None:
        if what not in tasks:
            tasks[what] = progress.add_task(what, total=total)
        progress.update(tasks[what], completed=done, total=total)

    return progress, update


def run_compression(model_name: str, recipe_path: Path | None, out: Path, calibration: Path | None, samples: int,
                    seq_len: int, overwrite: bool, recipe: Any = None, *, resume: bool = False,
                    nonfinite: str = "error", stream: bool = False) -> tuple[Any, Any]:
    """Load, compress and save; returns (source, compressed model). Shared by `compress` and `demo`.

    Finished blocks are checkpointed beside `out` (`.NAME.checkpoint/`); `resume` continues from them.
    `stream` reads the weights block by block from the model's safetensors files (`sparsepress.stream`).
    """
    import warnings

    from .checkpoint import Checkpoint
    from .errors import NonFiniteWarning
    from .io import _atomic_folder, save
    from .pipeline import NONFINITE_POLICIES
    from .pipeline import compress
    from .recipe import Recipe
    from .sources import calibration_samples, load_source, read_text
    from .spill import BlockSpill

    if nonfinite not in NONFINITE_POLICIES:
        raise InputError("--on-nonfinite", f"got {nonfinite!r}; allowed: {' | '.join(NONFINITE_POLICIES)}")
    recipe = recipe if recipe is not None else Recipe.from_yaml(recipe_path)  # type: ignore[arg-type]
    # Refuse a non-empty --out before any expensive work, and create nothing yet.
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        _atomic_folder(out, overwrite)
    source = load_source(model_name, stream=stream)
    if source.tokenizer is None:
        raise InputError(source.path, "no tokenizer files found; calibration needs one")
    text = read_text(calibration)
    ids = calibration_samples(source.tokenizer, text, samples, seq_len, recipe.seed,
                              source=str(calibration or "bundled calibration text"))
    checkpoint = Checkpoint.for_output(out, source.path, resume=resume)
    progress, update = _progress()
    # Streamed, each finished block's packed layers go to disk at once (a spill folder beside --out,
    # removed however the run ends), so memory does not grow with the blocks done.
    with BlockSpill.beside(out) if stream else nullcontext() as spill:
        try:
            with progress, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", NonFiniteWarning)
                try:
                    model = compress(source.model, recipe, calibration=ids, tokenizer=source.tokenizer,
                                     samples=len(ids), seq_len=seq_len, progress=update, nonfinite=nonfinite,
                                     checkpoint=checkpoint, weights=source.weights, spill=spill)
                finally:
                    for item in caught:
                        if issubclass(item.category, NonFiniteWarning):
                            errors.print(f"[yellow]warning:[/yellow] {item.message}", highlight=False)
                        else:
                            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)
        except BaseException:
            if any(p.name != "fingerprint.json" for p in checkpoint.folder.glob("*.json")):
                errors.print(f"finished work is kept in {checkpoint.folder}; rerun with --resume to continue",
                             highlight=False)
            raise
        model.sparsepress_source = source.path
        save(model, out, tokenizer=None, source=source.path, overwrite=overwrite)
    checkpoint.discard()
    return source, model


@app.command("compress")
@_clean_errors
def compress_command(
    model: str = typer.Argument(..., help="Hugging Face model folder, or 'minilm' for the bundled all-MiniLM-L6-v2"),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="YAML recipe"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="calibration text file (default: bundled WikiText-2 sample)"),
    samples: int = typer.Option(128, "--samples", min=1,
                                help="calibration windows of --seq-len tokens (plus twice as many single sentences)"),
    seq_len: int = typer.Option(128, "--seq-len", min=8, help="tokens per calibration sample"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its per-block checkpoint (.OUT.checkpoint/)"),
    on_nonfinite: str = typer.Option("error", "--on-nonfinite", help="error | skip: refuse NaN/Inf weights and activations, or zero / drop them with a warning"),
    stream: bool = typer.Option(False, "--stream", help="models larger than memory: read the weights block by block from the safetensors files (LLaMA / Mistral / Qwen2 / Qwen3 / BERT / RoBERTa)"),
) -> None:
    """Compress MODEL with a recipe and write a packed model folder."""
    from .io import read_manifest
    from .report import extra_tables, folder_bytes, human_bytes, layer_table

    source, _ = run_compression(model, recipe, out, calibration, samples, seq_len, overwrite,
                                resume=resume, nonfinite=on_nonfinite, stream=stream)
    manifest = read_manifest(out)
    console.print(layer_table(manifest, title=f"{out}"))
    for extra in extra_tables(manifest):
        console.print(extra)
    dense = sum(p.stat().st_size for p in Path(source.path).glob("model*.safetensors"))
    tensors = (out / "sparsepress.safetensors").stat().st_size
    console.print(f"tensors {human_bytes(tensors)} vs dense weights {human_bytes(dense)}: "
                  f"{tensors / max(dense, 1):.3f} of the dense file; folder {human_bytes(folder_bytes(out))}")


@app.command("inspect")
@_clean_errors
def inspect_command(
    folder: Path = typer.Argument(..., help="a sparsepress model folder"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="MoE models: write a routing figure (PNG) here"),
) -> None:
    """Per-layer table of a packed model folder: shape, pattern, sparsity, format, dtype, bytes (MoE: routing)."""
    from .io import verify_folder
    from .report import extra_tables, folder_bytes, human_bytes, kv_table, layer_table

    manifest = verify_folder(folder)
    console.print(layer_table(manifest, title=str(folder)))
    for extra in extra_tables(manifest):
        console.print(extra)
    console.print(kv_table("folder", [
        ("model class", manifest["model_class"]),
        ("format version", str(manifest["format_version"])),
        ("tensors file", human_bytes(sum((Path(folder) / name).stat().st_size
                                         for name in manifest.get("tensors_files", ["sparsepress.safetensors"])))),
        ("folder (all files)", human_bytes(folder_bytes(folder))),
        ("sha256 verified", "yes"),
        ("layer tensors verified", "yes"),
    ]))
    if "experts" in manifest:
        from .experts.report import plot_routing, routing_points_table, routing_table

        console.print(routing_table(manifest["experts"]))
        points = routing_points_table(manifest["experts"])
        if points is not None:
            console.print(points)
        if plot is not None:
            console.print(f"routing figure: {plot_routing(manifest['experts'], plot)}")


def _reference_for(manifest: dict[str, Any], reference: str | None) -> str:
    name = reference or manifest.get("source")
    if not name:
        raise InputError("--reference", "the folder does not record its source model; pass --reference MODEL")
    return name


def evaluate_folder(folder: Path, reference: str | None, text: Path | None, samples: int = 64, seq_len: int = 128) -> dict[str, float]:
    """Fidelity (and perplexity for causal LMs) of a folder against its dense reference."""
    from .evaluate import heldout_samples, quality
    from .io import load, read_manifest
    from .sources import load_source, read_text

    manifest = read_manifest(folder)
    model = load(folder)
    source = load_source(_reference_for(manifest, reference))
    if source.tokenizer is None:
        raise InputError(source.path, "no tokenizer files found")
    ids = heldout_samples(source.tokenizer, read_text(text, "heldout"), samples, seq_len,
                          source=str(text or "bundled held-out text"))
    return quality(model, source.model, ids, pad_id=source.tokenizer.pad_token_id or 0)


@app.command("eval")
@_clean_errors
def eval_command(
    folder: Path = typer.Argument(..., help="a sparsepress model folder"),
    reference: Optional[str] = typer.Option(None, "--reference", help="dense reference model (default: the recorded source)"),
    text: Optional[Path] = typer.Option(None, "--text", help="held-out text file (default: bundled WikiText-2 test sample)"),
    samples: int = typer.Option(64, "--samples", min=1),
    seq_len: int = typer.Option(128, "--seq-len", min=8),
) -> None:
    """Fidelity of FOLDER to its dense reference (mean cosine of pooled outputs); perplexity for causal LMs."""
    from .report import kv_table

    result = evaluate_folder(folder, reference, text, samples, seq_len)
    console.print(kv_table(f"eval {folder}", [(k, f"{v:.4f}") for k, v in result.items()]))


TORCH_BASELINES = ("torch fp32 (dense)", "torch dynamic int8 (dense)")


def bench_models(folder: Path, reference: str | None, batch: int, seq_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The models `bench` compares (torch fp32, torch dynamic int8, the folder) and one batch of inputs."""
    from .evaluate import dynamic_int8, random_batch
    from .io import load, read_manifest
    from .sources import load_source

    manifest = read_manifest(folder)
    model = load(folder)
    dense = load_source(_reference_for(manifest, reference)).model
    inputs = random_batch(dense, batch, seq_len)
    return {"torch fp32 (dense)": dense, "torch dynamic int8 (dense)": dynamic_int8(dense), "sparsepress": model}, inputs


def bench_rows(folder: Path, reference: str | None, batch: int, seq_len: int, repeats: int = 10) -> list[tuple[str, float]]:
    """Latency (ms) of torch fp32, torch dynamic int8 and the sparsepress folder, measured side by side."""
    from .evaluate import models_ms

    models, inputs = bench_models(folder, reference, batch, seq_len)
    return list(models_ms(models, inputs, rounds=repeats).items())


@app.command("bench")
@_clean_errors
def bench_command(
    folder: Path = typer.Argument(..., help="a sparsepress model folder"),
    batch: int = typer.Option(1, "--batch", min=1),
    seq_len: int = typer.Option(16, "--seq-len", min=1),
    reference: Optional[str] = typer.Option(None, "--reference", help="dense reference model (default: the recorded source)"),
    repeats: int = typer.Option(10, "--repeats", min=1),
    new_tokens: int = typer.Option(32, "--new-tokens", min=2, help="causal LMs: greedy tokens per decode run"),
) -> None:
    """Latency of FOLDER against the dense reference in torch fp32 and torch dynamic int8, side by side,
    and joules per inference (RAPL where readable, else a labelled estimate); for causal LMs also
    prefill and greedy-decode tokens/s (sparsepress on its native decode loop)."""
    from .energy import energy_per_inference
    from .evaluate import forward_runner, is_causal_lm, models_ms
    from .report import kv_table, latency_table

    models, inputs = bench_models(folder, reference, batch, seq_len)
    rows = list(models_ms(models, inputs, rounds=repeats).items())
    console.print(latency_table(f"latency, batch {batch} x {seq_len} tokens", rows, baselines=TORCH_BASELINES))
    energy = [(name, energy_per_inference(forward_runner(models[name], inputs), models[name], batch * seq_len,
                                          ms / 1000).label) for name, ms in rows]
    console.print(kv_table("energy per inference", energy))
    if is_causal_lm(models["sparsepress"]):
        from .runtime.speed import generation_rates

        rates = generation_rates(models, prompt=seq_len, new_tokens=new_tokens, rounds=max(1, repeats // 3), batch=batch)
        console.print(kv_table(f"generation, batch {batch}, prompt {seq_len} tokens, {new_tokens} new tokens", [
            (name, f"prefill {prefill:.1f} tokens/s, decode {decode:.1f} tokens/s") for name, prefill, decode in rates]))


@app.command("demo")
@_clean_errors
def demo_command(
    out: Path = typer.Option(DEMO_OUT, "--out", help="where the demo writes its folder"),
    samples: int = typer.Option(64, "--samples", min=1),
) -> None:
    """Compress the bundled all-MiniLM-L6-v2 with the default recipe and report size, sparsity, fidelity, latency."""
    from importlib import resources

    from .io import read_manifest
    from .recipe import Recipe
    from .report import folder_bytes, human_bytes, kv_table, latency_table, layer_table

    recipe = Recipe.from_yaml_text(resources.files("sparsepress.recipes").joinpath("demo.yaml").read_text())
    if out.exists() and any(out.iterdir()) and not (out / "sparsepress.json").is_file():
        raise InputError(out, "exists, is not empty and is not an earlier demo folder; pass another --out")
    console.print(f"compressing all-MiniLM-L6-v2 with the demo recipe ({_describe(recipe)}) into {out}/")
    source, _ = run_compression("minilm", None, out, None, samples, 128, overwrite=True, recipe=recipe)
    manifest = read_manifest(out)
    console.print(layer_table(manifest, title="per-layer sparsity"))
    result = evaluate_folder(out, None, None, samples=64, seq_len=128)
    dense_bytes = (Path(source.path) / "model.safetensors").stat().st_size
    tensors = (out / "sparsepress.safetensors").stat().st_size
    console.print(kv_table("size and quality", [
        ("dense model.safetensors", human_bytes(dense_bytes)),
        ("sparsepress.safetensors", human_bytes(tensors)),
        ("ratio", f"{tensors / dense_bytes:.3f}"),
        ("whole folder", human_bytes(folder_bytes(out))),
        ("fidelity (mean cosine to dense, held-out text)", f"{result['fidelity']:.4f}"),
    ]))
    _demo_sentence_transformer(out)
    for batch, seq_len in ((1, 16), (8, 64)):
        rows = bench_rows(out, None, batch, seq_len, repeats=10)
        console.print(latency_table(f"latency, batch {batch} x {seq_len} tokens", rows, baselines=TORCH_BASELINES))


from .interop.commands import register as _register_interop_commands  # noqa: E402

_register_interop_commands(app, _clean_errors)  # export, generate


def _demo_sentence_transformer(out: Path) -> None:
    """The packed folder as a SentenceTransformer (when sentence-transformers is installed)."""
    from .interop.sentence_transformers import load_sentence_transformer

    try:
        st = load_sentence_transformer(out)
    except InputError as exc:
        console.print(f"(sentence-transformers view skipped: {exc.problem})")
        return
    pairs = ("A man is playing a guitar.", "Someone plays an instrument.", "The stock market fell today.")
    emb = st.encode(list(pairs), convert_to_tensor=True)
    console.print(f"sp.load_sentence_transformer({out}): cosine({pairs[0]!r}, {pairs[1]!r}) = "
                  f"{float(emb[0] @ emb[1]):.3f}, with {pairs[2]!r} = {float(emb[0] @ emb[2]):.3f}", highlight=False)


from .sweep.commands import report_command, sweep_command  # noqa: E402

app.command("sweep")(_clean_errors(sweep_command))
app.command("report")(_clean_errors(report_command))


def _describe(recipe: Any) -> str:
    return ", ".join(
        " ".join(f"{k}={v}" for k, v in stage.model_dump(exclude_defaults=True).items()) or stage.kind
        for stage in recipe.stages
    )


def main() -> None:
    """Entry point of the `sparsepress` console script."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
