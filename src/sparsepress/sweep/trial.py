"""One trial's work, as plain functions a Ray task (or this process) runs: compress + evaluate, and timing.

`run_trial` rebuilds the source model from the shipped payload, compresses it with the trial's
recipe, saves the packed folder into a scratch folder, measures its size as `ls -l` adds it up,
loads it back exactly as a user would (`sp.load`) and scores it as `sparsepress eval` does, plus the
user's metric when one is named. It returns the numbers and the folder's files, so that the driver,
the only writer of the sweep folder, stores them (workers of a cluster share no disk with it).

`measure_latency` writes a stored folder to scratch, loads it and times it against the dense model,
interleaved in one process, under a `Contention` probe; then joules per inference of both (RAPL where
readable, else `sparsepress.energy`'s labelled estimate).

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.sources import load_source
    >>> from sparsepress.sweep.source import pack_source
    >>> folder = tempfile.mkdtemp()
    >>> BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                      intermediate_size=64, vocab_size=60)).save_pretrained(folder)
    >>> payload = pack_source(load_source(folder), name=folder)
    >>> ids = [torch.randint(1, 60, (12,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    >>> recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}]}
    >>> outcome = run_trial(payload, ids, ids, recipe)
    >>> outcome.size_bytes == sum(len(b) for b in outcome.files.values()), 0.5 < outcome.fidelity <= 1.0001
    (True, True)
    >>> timing = measure_latency(payload, outcome.files, batch=1, seq_len=8, rounds=2)
    >>> timing.latency_ms > 0 and timing.dense_ms > 0
    True
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .source import SourcePayload, load_tokenizer, rebuild_model, source_folder, write_files


@dataclass
class TrialOutcome:
    """What a finished trial measured, and its packed folder's files by relative path."""

    size_bytes: int
    tensors_bytes: int
    fidelity: float
    perplexity: float | None
    user_metric: float | None
    compress_s: float
    wall_s: float
    files: dict[str, bytes]


@dataclass
class LatencyOutcome:
    """A trial's median latency beside the dense model's, measured interleaved, and how clean it was."""

    latency_ms: float
    dense_ms: float
    others_cores: float | None
    contended: bool
    cpu: str
    threads: int
    energy_j: float | None = None
    dense_energy_j: float | None = None
    energy_source: str | None = None


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with torch on `count` threads, then put the caller's count back.

    Example:
        >>> before = torch.get_num_threads()
        >>> with torch_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_trial(
    payload: SourcePayload,
    calibration: list[torch.Tensor],
    heldout: list[torch.Tensor],
    recipe: dict[str, Any],
    *,
    threads: int = 1,
    user_metric: Callable[..., Any] | None = None,
) -> TrialOutcome:
    """Compress, save, measure and evaluate one recipe; any failure propagates (the driver records it)."""
    from ..evaluate import quality
    from ..io import TENSORS, load, save
    from ..pipeline import compress
    from ..recipe import Recipe
    from ..report import folder_bytes

    start = time.perf_counter()
    with torch_threads(max(1, int(threads))), tempfile.TemporaryDirectory(prefix="sparsepress-trial-") as work:
        tokenizer = load_tokenizer(payload, work)
        model = rebuild_model(payload, work)
        compressed = compress(
            model,
            Recipe.model_validate(recipe),
            calibration=calibration,
            tokenizer=tokenizer,
            samples=len(calibration),
            seq_len=max(len(ids) for ids in calibration),
        )
        compress_s = time.perf_counter() - start
        compressed.sparsepress_source = payload.path
        out = Path(work) / "packed"
        save(compressed, out, source=source_folder(payload, work))
        _record_source(out, payload.path)
        del compressed, model
        packed, dense = load(out), rebuild_model(payload, work)
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        scores = quality(packed, dense, heldout, pad_id=pad)
        metric = float(user_metric(packed, dense)) if user_metric is not None else None
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        return TrialOutcome(
            size_bytes=folder_bytes(out),
            tensors_bytes=(out / TENSORS).stat().st_size,
            fidelity=scores["fidelity"],
            perplexity=scores.get("perplexity"),
            user_metric=metric,
            compress_s=compress_s,
            wall_s=time.perf_counter() - start,
            files=files,
        )


def _record_source(folder: Path, source: str) -> None:
    """Point the manifest's `source` at the user's model folder, not the worker's scratch copy.

    `save` records where the side files came from; here that is a scratch folder that is gone once
    the trial ends, and `sparsepress eval` / `bench` of the stored folder need the real source.
    """
    import json

    from ..io import MANIFEST

    path = folder / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["source"] = source
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def measure_latency(
    payload: SourcePayload,
    files: dict[str, bytes],
    *,
    batch: int,
    seq_len: int,
    rounds: int,
    threads: int | None = None,
) -> LatencyOutcome:
    """Median forward latency (ms) of a stored folder and of the dense model, interleaved on one batch."""
    from ..energy import energy_per_inference
    from ..evaluate import forward_runner, models_ms, random_batch
    from ..io import load
    from .machine import Contention, cpu_name, usable_cpus

    threads = threads or usable_cpus()
    with torch_threads(threads), tempfile.TemporaryDirectory(prefix="sparsepress-latency-") as work:
        packed = load(write_files(files, Path(work) / "packed"))
        dense = rebuild_model(payload, work)
        inputs = random_batch(dense, batch, seq_len)
        with Contention() as probe:
            times = models_ms({"packed": packed, "dense": dense}, inputs, rounds=rounds)
        tokens = batch * seq_len
        energy = {name: energy_per_inference(forward_runner(model, inputs), model, tokens, times[name] / 1000)
                  for name, model in (("packed", packed), ("dense", dense))}
    return LatencyOutcome(
        latency_ms=times["packed"],
        dense_ms=times["dense"],
        others_cores=probe.others_cores,
        contended=probe.contended,
        cpu=cpu_name(),
        threads=threads,
        energy_j=energy["packed"].joules,
        dense_energy_j=energy["dense"].joules,
        energy_source=energy["packed"].source,
    )
