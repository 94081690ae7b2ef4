"""The sweep loop: expand the grid, ship the model and data once, run trials, store each as it lands, time.

Phase 1 runs every unfinished trial (compress + evaluate) as a task, at most as many at once as the
cluster has slots, and records each row the moment its task returns: the packed folder goes to
`SWEEP/trials/NNN/` (atomically), the row to the SQLite store and results.csv. A trial that raises
is recorded as failed with its error and the sweep goes on. Phase 2 times every finished trial
that has no latency yet, one task at a time holding all CPUs of one node, so Ray runs nothing beside
it; the `Contention` probe flags timings that other processes disturbed. `resume=True` skips every
trial already done or failed (and every latency already measured): an interrupted sweep loses at most
the trials that were in flight, and no finished trial is run twice.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.sweep.runners import InlineRunner
    >>> folder = Path(tempfile.mkdtemp())
    >>> BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
    ...                      vocab_size=60)).save_pretrained(folder / "model")
    >>> grid = folder / "grid.yaml"
    >>> _ = grid.write_text("recipe: {stages: [{prune: {method: magnitude, sparsity: 0.5}}]}\\n"
    ...                     "vary: {stages.0.prune.sparsity: [0.5, 0.7]}\\n"
    ...                     "settings: {latency: null}\\n")
    >>> ids = [torch.randint(1, 60, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    >>> store = run_sweep(str(folder / "model"), grid, folder / "sweep", runner=InlineRunner(), data=(ids, ids))
    >>> [(r["trial"], r["status"]) for r in store.rows()]
    [(0, 'done'), (1, 'done')]
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console

from ..errors import GridError
from .grid import Grid, SweepSettings, Trial, expand_grid, load_callable, read_grid_text
from .live import SweepView
from .runners import InlineRunner, RayRunner, TaskFailed, make_runner
from .store import ResultsStore
from .trial import measure_latency, run_trial

TRIALS_DIR = "trials"
GRID_COPY = "grid.yaml"
WAIT_S = 0.5


def trial_folder(sweep: str | Path, index: int) -> Path:
    """Where trial `index`'s packed model folder is kept.

    Example:
        >>> trial_folder("s", 7).as_posix()
        's/trials/007'
    """
    return Path(sweep) / TRIALS_DIR / f"{index:03d}"


def run_sweep(
    model: str,
    grid_path: str | Path,
    out: str | Path,
    *,
    address: str | None = None,
    resume: bool = False,
    latency: bool = True,
    retry_failed: bool = False,
    calibration: str | Path | None = None,
    text: str | Path | None = None,
    console: Console | None = None,
    runner: InlineRunner | RayRunner | None = None,
    data: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None = None,
) -> ResultsStore:
    """Run (or resume) the sweep of `model` over the grid file into `out`; returns its results store.

    `address`: None starts a local Ray, `inline` runs here, anything else joins that Ray cluster
    (ignored when a `runner` is given). `latency=False` leaves timing for a later `resume`.
    `data` (calibration ids, held-out ids) replaces the text-derived samples (tests, custom data).
    """
    grid_path, out = Path(grid_path), Path(out)
    grid = expand_grid(read_grid_text(grid_path))
    console = console or Console(stderr=True)
    store = _open_store(out, grid, model, grid_path, resume)
    try:
        if _work_left(store, grid.settings, latency, retry_failed):
            _run(
                store,
                grid,
                model,
                latency=latency,
                retry_failed=retry_failed,
                address=address,
                runner=runner,
                calibration=calibration,
                text=text,
                data=data,
                console=console,
            )
        store.export_csv()
    finally:
        store.close()
    return ResultsStore.open(out)


def _open_store(out: Path, grid: Grid, model: str, grid_path: Path, resume: bool) -> ResultsStore:
    if resume and out.exists():
        return ResultsStore.open(out, grid, model=model)
    store = ResultsStore.create(out, grid, model=model, grid_text=grid_path.read_text(encoding="utf-8"))
    shutil.copyfile(grid_path, out / GRID_COPY)
    return store


def _unfinished(rows: list[dict[str, Any]], retry_failed: bool) -> list[int]:
    wanted = {"pending", "running", *(("failed",) if retry_failed else ())}
    return [r["trial"] for r in rows if r["status"] in wanted]


def _untimed(rows: list[dict[str, Any]]) -> list[int]:
    return [r["trial"] for r in rows if r["status"] == "done" and r["latency_ms"] is None]


def _work_left(store: ResultsStore, settings: SweepSettings, latency: bool, retry_failed: bool) -> bool:
    rows = store.rows()
    return bool(
        _unfinished(rows, retry_failed) or (latency and settings.latency is not None and _untimed(rows))
    )


def _run(
    store: ResultsStore,
    grid: Grid,
    model: str,
    *,
    latency: bool,
    retry_failed: bool,
    address: str | None,
    runner: InlineRunner | RayRunner | None,
    calibration: Any,
    text: Any,
    data: Any,
    console: Console,
) -> None:
    from ..sources import load_source
    from .machine import cpu_name
    from .source import pack_source

    settings = grid.settings
    session = store.begin_session()
    source = load_source(model)
    payload = pack_source(source, name=model)
    metric = load_callable(settings.user_metric) if settings.user_metric else None
    todo = _unfinished(store.rows(), retry_failed)
    seeds = sorted({grid.trials[i].recipe.seed for i in todo})
    calibrations, heldout = _samples(source, settings, seeds, calibration, text, data)
    _record_reference(store, source, payload, heldout, metric)
    del source
    store.set_meta(cpu=cpu_name())
    if runner is None:
        runner = make_runner(address, object_store_bytes=_object_store_bytes(payload))
    try:
        if metric is not None:
            runner.share_module(metric.__module__)
        with SweepView(console) as view:
            payload_ref = runner.put(payload)
            calibration_refs = {seed: runner.put(ids) for seed, ids in calibrations.items()}
            heldout_ref = runner.put(heldout)
            _run_trials(
                store,
                runner,
                view,
                [grid.trials[i] for i in todo],
                settings,
                payload,
                payload_ref,
                calibration_refs,
                heldout_ref,
                metric,
                session,
            )
            if latency and settings.latency is not None:
                _run_timings(store, runner, view, settings, payload_ref, session)
    finally:
        runner.close()
        store.end_session(session)


def _samples(
    source: Any, settings: SweepSettings, seeds: list[int], calibration: Any, text: Any, data: Any
) -> tuple[dict[int, list[torch.Tensor]], list[torch.Tensor]]:
    """Calibration ids per recipe seed (as `sparsepress compress` makes them) and the held-out ids (as `eval`)."""
    from ..errors import InputError
    from ..evaluate import heldout_samples
    from ..sources import calibration_samples, read_text

    if data is not None:
        return {seed: list(data[0]) for seed in seeds}, list(data[1])
    if source.tokenizer is None:
        raise InputError(source.path, "no tokenizer files found; calibration and evaluation need one")
    calibration_text = read_text(calibration)
    calibrations = {
        seed: calibration_samples(
            source.tokenizer,
            calibration_text,
            settings.samples,
            settings.seq_len,
            seed,
            source=str(calibration or "bundled calibration text"),
        )
        for seed in seeds
    }
    heldout = heldout_samples(
        source.tokenizer,
        read_text(text, "heldout"),
        settings.eval_samples,
        settings.eval_seq_len,
        source=str(text or "bundled held-out text"),
    )
    return calibrations, heldout


def _record_reference(
    store: ResultsStore, source: Any, payload: Any, heldout: list[torch.Tensor], metric: Any
) -> None:
    """The dense model's own marks for the report: size, and perplexity / user metric once."""
    from ..evaluate import perplexity

    values: dict[str, Any] = {
        "dense_bytes": payload.dense_folder_bytes,
        "source_path": payload.path,
        "causal": payload.causal,
    }
    pad = getattr(source.tokenizer, "pad_token_id", None) or 0
    if payload.causal and store.meta("dense_perplexity") is None:
        values["dense_perplexity"] = perplexity(source.model, heldout, pad_id=pad)
    if metric is not None and store.meta("dense_user_metric") is None:
        try:
            values["dense_user_metric"] = float(metric(source.model, source.model))
        except Exception as exc:  # the user's code: refuse before any long work, naming it
            raise GridError(
                "settings.user_metric", f"failed on the dense model: {type(exc).__name__}: {exc}"
            ) from None
    store.set_meta(**values)


def _object_store_bytes(payload: Any) -> int:
    """Room for the model, its data and a few trial folders in flight."""
    return int(max(256 << 20, 4 * payload.weights_bytes + (256 << 20)))


def _trial_memory(settings: SweepSettings, payload: Any) -> int:
    """What one trial declares to Ray: the given `memory_gb`, else three model copies and 1 GiB."""
    if settings.memory_gb is not None:
        return int(settings.memory_gb * (1 << 30))
    return int(3 * payload.weights_bytes + (1 << 30))


def _run_trials(
    store: ResultsStore,
    runner: Any,
    view: SweepView,
    trials: list[Trial],
    settings: SweepSettings,
    payload: Any,
    payload_ref: Any,
    calibration_refs: dict[int, Any],
    heldout_ref: Any,
    metric: Any,
    session: int,
) -> None:
    queue = list(trials)
    in_flight: dict[Any, Trial] = {}
    slots = max(1, int(runner.slots // settings.cpus))
    memory = _trial_memory(settings, payload)
    view.update(store.rows(), "trials")
    while queue or in_flight:
        while queue and len(in_flight) < slots:
            trial = queue.pop(0)
            handle = runner.submit(
                run_trial,
                payload_ref,
                calibration_refs[trial.recipe.seed],
                heldout_ref,
                trial.recipe.to_dict(),
                cpus=settings.cpus,
                memory=memory,
                threads=max(1, int(settings.cpus)),
                user_metric=metric,
            )
            in_flight[handle] = trial
            store.mark_running(trial.index)
            view.update(store.rows(), "trials")
        for handle in runner.wait(list(in_flight), timeout=WAIT_S):
            trial = in_flight.pop(handle)
            try:
                outcome = runner.result(handle)
            except TaskFailed as exc:
                store.record_failure(trial.index, str(exc))
                view.event(f"trial {trial.index} ({trial.label}) failed: {exc}")
            else:
                _write_folder(outcome.files, trial_folder(store.folder, trial.index))
                store.record_outcome(trial.index, outcome)
                view.event(
                    f"trial {trial.index} ({trial.label}) done: fidelity {outcome.fidelity:.4f}, "
                    f"{outcome.size_bytes} bytes, {outcome.wall_s:.0f} s"
                )
            store.end_session(session)
            view.update(store.rows(), "trials")


def _run_timings(
    store: ResultsStore, runner: Any, view: SweepView, settings: SweepSettings, payload_ref: Any, session: int
) -> None:
    timing = settings.latency
    assert timing is not None
    for index in _untimed(store.rows()):
        view.update(store.rows(), f"latency (one trial at a time, {runner.exclusive_cpus()} CPUs)")
        files_ref = runner.put(read_folder(trial_folder(store.folder, index)))
        handle = runner.submit(
            measure_latency,
            payload_ref,
            files_ref,
            batch=timing.batch,
            seq_len=timing.seq_len,
            rounds=timing.rounds,
            threads=runner.exclusive_cpus(),
            cpus=runner.exclusive_cpus(),
            memory=0,
            exclusive=True,
        )
        while not runner.wait([handle], timeout=WAIT_S):
            pass
        try:
            result = runner.result(handle)
        except TaskFailed as exc:
            store.record_latency_error(index, str(exc))
            view.event(f"trial {index}: timing failed: {exc}")
        else:
            store.record_latency(index, result)
            flag = " (under contention)" if result.contended else ""
            view.event(f"trial {index}: {result.latency_ms:.2f} ms vs dense {result.dense_ms:.2f} ms{flag}")
        store.end_session(session)
    view.update(store.rows(), "done")


def read_folder(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path.

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp()); _ = (d / "x").write_bytes(b"1")
        >>> read_folder(d)
        {'x': b'1'}
    """
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_folder(files: dict[str, bytes], target: Path) -> None:
    """Write a trial's folder next to its final place, then swap it in (a crash leaves no half folder)."""
    from ..io import _replace_folder
    from .source import write_files

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write_files(files, staging)
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        _replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
