"""The runtime controller under a CPU hog: a request stream on all-MiniLM-L6-v2 with and without it.

all-MiniLM-L6-v2 is compressed once (Wanda, elastic levels 0.5 / 0.7 / 0.9, RTN int8, int8 embeddings,
plus an `activation_sparsity` stage with its ladder of levels) and cached under --out (reruns load it).
A stream of requests (batch 1, one WikiText-2 sentence of 16-64 tokens each, back to back) runs for
--before / --hog / --after seconds; during the middle phase one busy-looping process per core competes
for the CPUs. The same trace runs once per mode:
- `fixed`: no controller, the best (most accurate) operating point throughout;
- `controller`: `sp.AdaptiveController` driven by observed latency only;
- `controller+cpu`: the same with `cpu_signal()` (psutil) as a ceiling on cost;
- `sparsity-only` (optional): the controller without its thread-count points (all threads throughout).
Operating points include the thread count (1 and torch's count) where it can be set per call.
The target is --target-factor x the unloaded median (--target-of p95: p95) latency of the best point on
the trace.

Printed: the CPU model and ISA; per mode and phase, p50 / p95 / p99 latency and p95 / target; the
operating points used (histogram) with their fidelity (mean cosine of pooled outputs to the dense
model on held-out windows) and the use-weighted fidelity; the time from the hog's end to the first
call back at the best point (and the first of a run of 20 calls there); and the controller's per-call
overhead (controller call against a direct model call at batch 1, interleaved, median).

Example (a timing: take the shared machine's bench lock):
    flock /work/bench.lock python benchmarks/adaptive.py --out bench-out/adaptive
    python benchmarks/adaptive.py --before 3 --hog 5 --after 5 --modes fixed controller
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import sparsepress as sp
from sparsepress.adaptive import AdaptiveController, PointKey, cpu_signal, operating_points
from sparsepress.evaluate import fidelity, interleaved_ms
from sparsepress.io import MANIFEST
from sparsepress.native import active_isa
from sparsepress.nn.threads import KNOB as THREADS
from sparsepress.sources import bundled_text, load_source, split_sentences, token_samples

LEVELS = [0.5, 0.7, 0.9]
PHASES = ("before", "hog", "after")
SETTLED_CALLS = 20  # "back at the best point" = the first of this many calls in a row there


def recipe(activation: bool) -> dict[str, Any]:
    stages: list[dict[str, Any]] = [{"prune": {"method": "wanda", "sparsity": LEVELS}},
                                    {"quantize": {"method": "rtn", "bits": 8}},
                                    {"quantize_embeddings": {"bits": 8}}]
    if activation:
        stages.append({"activation_sparsity": {"sparsity": 0.0}})
    return {"stages": stages, "format": "bitmask"}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def compressed_model(source: Any, out: Path, activation: bool, samples: int) -> torch.nn.Module:
    folder = out / ("minilm-elastic-act" if activation else "minilm-elastic")
    if not (folder / MANIFEST).is_file():
        start = time.perf_counter()
        model = sp.compress(copy.deepcopy(source.model), recipe(activation), tokenizer=source.tokenizer,
                            samples=samples)
        sp.save(model, folder, source=source.path, overwrite=True)
        print(f"compressed in {time.perf_counter() - start:.0f} s -> {folder}", flush=True)
    return sp.load(folder).eval()


def request_trace(tokenizer: Any, count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`count` batch-1 requests: held-out sentences (joined with the next ones when short) of 16-64 tokens."""
    sentences = split_sentences(bundled_text("heldout"))
    rng = random.Random(seed)
    trace = []
    while len(trace) < count:
        start = rng.randrange(len(sentences))
        text = sentences[start]
        ids = tokenizer(text, truncation=True, max_length=64)["input_ids"]
        for extra in sentences[start + 1:start + 4]:
            if len(ids) >= 16:
                break
            text += " " + extra
            ids = tokenizer(text, truncation=True, max_length=64)["input_ids"]
        if 16 <= len(ids) <= 64:
            tensor = torch.tensor([ids])
            trace.append({"input_ids": tensor, "attention_mask": torch.ones_like(tensor)})
    return trace


def _busy() -> None:
    x = 0
    while True:
        x += 1


@dataclass
class Run:
    mode: str
    calls: list[tuple[float, float, PointKey]] = field(default_factory=list)  # (start s, ms, point)
    hog_start: float = 0.0
    hog_stop: float = 0.0

    def phase(self, at: float) -> str:
        return "before" if at < self.hog_start else "hog" if at < self.hog_stop else "after"


def stream(mode: str, call: Callable[[dict[str, torch.Tensor]], Any], point: Callable[[], PointKey],
           trace: list[dict[str, torch.Tensor]], seconds: tuple[float, float, float], hogs: int) -> Run:
    """Send the trace's requests back to back for the three phases; hog processes run in the middle one."""
    run = Run(mode)
    context = multiprocessing.get_context("fork")
    procs: list[Any] = []
    begin = time.perf_counter()
    run.hog_start, run.hog_stop = begin + seconds[0], begin + seconds[0] + seconds[1]
    end = run.hog_stop + seconds[2]
    i = 0
    try:
        while True:
            now = time.perf_counter()
            if now >= end:
                break
            if not procs and run.hog_start <= now < run.hog_stop:
                procs = [context.Process(target=_busy, daemon=True) for _ in range(hogs)]
                for p in procs:
                    p.start()
                run.hog_start = now
            if procs and now >= run.hog_stop:
                _stop(procs)
                procs = []
                run.hog_stop = time.perf_counter()
            request = trace[i % len(trace)]
            at = point()  # the point this call runs at (the controller applies it before the forward)
            start = time.perf_counter()
            with torch.inference_mode():
                call(request)
            run.calls.append((start, (time.perf_counter() - start) * 1000.0, at))
            i += 1
    finally:
        _stop(procs)
    return run


def _stop(procs: list[Any]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.join()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


def label(point: PointKey) -> str:
    return " ".join(f"{name} {value:g}" for name, value in point)


def return_time(run: Run, best: PointKey) -> tuple[float, float]:
    """Seconds from the hog's end to the first call at `best`, and to the first of SETTLED_CALLS in a row."""
    after = [(t, p) for t, _, p in run.calls if t >= run.hog_stop]
    first = next((t - run.hog_stop for t, p in after if p == best), float("nan"))
    settled = float("nan")
    for k in range(len(after) - SETTLED_CALLS + 1):
        if all(p == best for _, p in after[k:k + SETTLED_CALLS]):
            settled = after[k][0] - run.hog_stop
            break
    return first, settled


def report(run: Run, target: float, best: PointKey, fidelities: dict[PointKey, float]) -> list[str]:
    lines = []
    for phase in PHASES:
        ms = [m for t, m, _ in run.calls if run.phase(t) == phase]
        p95 = percentile(ms, 95)
        lines.append(f"| {run.mode} | {phase} | {len(ms)} | {percentile(ms, 50):.2f} | {p95:.2f} | "
                     f"{percentile(ms, 99):.2f} | {p95 / target:.2f}x |")
    return lines


def usage(run: Run, fidelities: dict[PointKey, float]) -> list[str]:
    lines = []
    for phase in (*PHASES, "all"):
        used = Counter(p for t, _, p in run.calls if phase == "all" or run.phase(t) == phase)
        total = sum(used.values())
        spent = sum(fidelities[p] * n for p, n in used.items()) / max(total, 1)
        histogram = ", ".join(f"{label(p)}: {100 * n / total:.0f}%" for p, n in
                              sorted(used.items(), key=lambda kv: -fidelities[kv[0]]))
        lines.append(f"| {run.mode} | {phase} | {histogram} | {spent:.4f} |")
    return lines


def overhead(model: torch.nn.Module, ctl: AdaptiveController, request: dict[str, torch.Tensor],
             rounds: int) -> tuple[float, float, float]:
    """(direct ms, controller ms, the controller's own bookkeeping in ms around a no-op model)."""
    def direct() -> None:
        with torch.inference_mode():
            model(**request)

    def controlled() -> None:
        with torch.inference_mode():
            ctl(**request)

    times = interleaved_ms({"direct": direct, "controller": controlled}, rounds=rounds, warmup=5)
    ticks = AdaptiveController(torch.nn.Identity(), target_ms=ctl.target_ms, knobs=list(ctl.knobs.values()),
                               levels=[p for p, _ in ((tuple(d.items()), c) for d, c in ctl.points)],
                               costs={tuple(d.items()): c for d, c in ctl.points})
    ticks._apply = lambda point: None  # the no-op model has no levels to set; time only the bookkeeping
    x = torch.ones(1)
    start = time.perf_counter()
    for _ in range(20_000):
        ticks(x)
    bare = (time.perf_counter() - start) * 1000.0 / 20_000
    return times["direct"], times["controller"], bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/adaptive"))
    parser.add_argument("--samples", type=int, default=64, help="calibration windows for compression")
    parser.add_argument("--no-activation", action="store_true", help="elastic levels only")
    parser.add_argument("--before", type=float, default=6.0)
    parser.add_argument("--hog", type=float, default=10.0)
    parser.add_argument("--after", type=float, default=8.0)
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 1, help="busy processes (default: one per core)")
    parser.add_argument("--target-factor", type=float, default=1.3)
    parser.add_argument("--target-of", choices=("median", "p95"), default="median",
                        help="the unloaded latency of the best point the target is a factor of")
    parser.add_argument("--modes", nargs="*", default=["fixed", "controller", "controller+cpu"])
    parser.add_argument("--overhead-rounds", type=int, default=400)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"CPU: {cpu_model()}; ISA tree: {active_isa()}; torch threads: {torch.get_num_threads()}; "
          f"cores: {os.cpu_count()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')!r} "
          f"GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT', '')!r}", flush=True)

    source = load_source("minilm")
    model = compressed_model(source, args.out, not args.no_activation, args.samples)
    points = operating_points(model)
    trace = request_trace(source.tokenizer, 400, seed=0)
    lengths = [int(r["input_ids"].shape[1]) for r in trace]
    print(f"trace: {len(trace)} requests, {min(lengths)}-{max(lengths)} tokens (median "
          f"{statistics.median(lengths):.0f}); {len(points)} operating points", flush=True)

    windows = token_samples(source.tokenizer, bundled_text("heldout"), 64, 64, seed=1)
    pad = source.tokenizer.pad_token_id or 0
    fidelities: dict[PointKey, float] = {}
    ctl = AdaptiveController(model, target_ms=1.0, calibration_calls=15)  # costs only, on one median-length request
    with torch.inference_mode():  # as the stream calls run (with autograd on, every point costs ~20x more)
        ctl(**trace[lengths.index(sorted(lengths)[len(lengths) // 2])])
    costs = {tuple(d.items()): c for d, c in ctl.points}
    by_rung: dict[PointKey, float] = {}
    for point in points:  # the thread count leaves outputs unchanged: one fidelity per accuracy setting
        rung = tuple(kv for kv in point if kv[0] != THREADS)
        if rung not in by_rung:
            ctl._apply(point)
            by_rung[rung] = fidelity(model, source.model, windows, pad_id=pad)
        fidelities[point] = by_rung[rung]
    best = max(points, key=lambda p: (fidelities[p], -costs[p]))
    print("| operating point | cost ms (calibration) | fidelity |\n|---|---|---|")
    for point, cost in sorted(costs.items(), key=lambda kv: -kv[1]):
        print(f"| {label(point)} | {cost:.2f} | {fidelities[point]:.4f} |")

    ctl._apply(best)
    unloaded = []
    for request in trace[:200]:
        start = time.perf_counter()
        with torch.inference_mode():
            model(**request)
        unloaded.append((time.perf_counter() - start) * 1000.0)
    target = args.target_factor * (statistics.median(unloaded) if args.target_of == "median"
                                   else percentile(unloaded, 95))
    print(f"best point: {label(best)}; unloaded median {statistics.median(unloaded):.2f} ms, p95 "
          f"{percentile(unloaded, 95):.2f} ms; target {target:.2f} ms", flush=True)

    seconds = (args.before, args.hog, args.after)
    runs = []
    for mode in args.modes:
        if mode == "fixed":
            ctl._apply(best)
            runs.append(stream(mode, lambda r: model(**r), lambda: best, trace, seconds, args.hogs))
        else:
            signal = cpu_signal() if mode == "controller+cpu" else None
            most = max((dict(p).get(THREADS, 0.0) for p in points), default=0.0)
            used = [p for p in points if mode != "sparsity-only" or dict(p).get(THREADS, most) == most]
            controller = AdaptiveController(model, target_ms=target, levels=used, signal=signal,
                                            costs={p: costs[p] for p in used})
            runs.append(stream(mode, lambda r, c=controller: c(**r),
                               lambda c=controller: tuple(c.level.items()), trace, seconds, args.hogs))
        print(f"({mode}: {len(runs[-1].calls)} calls)", flush=True)

    print("\n| mode | phase | calls | p50 ms | p95 ms | p99 ms | p95 / target |\n|---|---|---|---|---|---|---|")
    for run in runs:
        print("\n".join(report(run, target, best, fidelities)))
    print("\n| mode | phase | points used | fidelity spent |\n|---|---|---|---|")
    for run in runs:
        print("\n".join(usage(run, fidelities)))
    for run in runs:
        first, settled = return_time(run, best)
        print(f"{run.mode}: back at the best point {first:.2f} s after the hog stopped "
              f"({SETTLED_CALLS} calls in a row there from {settled:.2f} s)")

    ctl._apply(best)
    request = trace[lengths.index(sorted(lengths)[len(lengths) // 2])]
    steady = AdaptiveController(model, target_ms=1e6, levels=[best], costs={best: costs[best]})
    direct, controlled, bare = overhead(model, steady, request, args.overhead_rounds)
    print(f"\noverhead at batch 1 x {request['input_ids'].shape[1]} tokens: direct {direct:.3f} ms, via the "
          f"controller {controlled:.3f} ms ({100 * (controlled / direct - 1):+.2f}%); the controller's own "
          f"bookkeeping around a no-op model {1000 * bare:.1f} us ({100 * bare / direct:.2f}% of the call)")


if __name__ == "__main__":
    main()
