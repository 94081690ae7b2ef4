"""A controller that keeps a model's latency on target by moving between its runtime operating points.

An operating point fixes every runtime knob the model has (its elastic sparsity level, its activation
sparsity level, ...; each knob is registered by the module that implements it with `register_knob`).
The controller measures what each point costs (a short calibration on the first call's inputs, or
given `costs`), orders the points from most to least expensive (most to least accurate), starts at
the most accurate one, and after every call compares a moving percentile of the observed latency with
the target:
- above the target: one step cheaper at once (after a short dwell, so one slow call cannot run it down);
- comfortably below: one step dearer, but only when the dearer point's cost, scaled by how much slower
  than calibrated the machine runs right now, is predicted to stay under `headroom` x target, and only
  after a full window at the current point (hysteresis: it does not oscillate);
- an optional `signal()` (a resource reading mapped to a ceiling on relative cost, e.g. the CPU share
  other processes leave us, see `cpu_signal`) rules out points dearer than the ceiling at once.

Calls may come from many threads: the controller's state is guarded by one lock, the forward itself
runs outside it, and a point is applied between calls (the knobs' setters guarantee that a call in
flight sees one level, never a mix).

Example:
    >>> import torch
    >>> ticks = iter(range(0, 10_000, 5))  # a scripted clock: every call takes 5 ms
    >>> knob = Knob("speed", levels=lambda m: [1.0, 2.0], apply=lambda m, v: None)
    >>> ctl = AdaptiveController(torch.nn.Identity(), target_ms=4.0, knobs=[knob],
    ...                          costs={(("speed", 1.0),): 5.0, (("speed", 2.0),): 2.5}, dwell=1,
    ...                          clock=lambda: next(ticks) / 1000)
    >>> _ = [ctl(torch.ones(1)) for _ in range(3)]
    >>> ctl.level, len(ctl.history)
    ({'speed': 2.0}, 3)
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

PointKey = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Knob:
    """One runtime knob: its stored levels on a model (empty: the model has none) and how to set one."""

    name: str
    levels: Callable[[nn.Module], list[float]]
    apply: Callable[[nn.Module, float], None]


KNOBS: list[Knob] = []


def register_knob(knob: Knob) -> Knob:
    """Offer `knob` to every controller (the modules implementing runtime levels call this once).

    Example:
        >>> k = register_knob(Knob("demo", levels=lambda m: [], apply=lambda m, v: None))
        >>> KNOBS.remove(k)
    """
    if any(existing.name == knob.name for existing in KNOBS):
        raise ValueError(f"a knob named {knob.name!r} is already registered")
    KNOBS.append(knob)
    return knob


def operating_points(model: nn.Module, knobs: Sequence[Knob] | None = None) -> list[PointKey]:
    """Every combination of the model's stored levels, one entry per knob that has levels.

    Example:
        >>> a = Knob("a", levels=lambda m: [0.5, 0.9], apply=lambda m, v: None)
        >>> b = Knob("b", levels=lambda m: [0.0, 0.4], apply=lambda m, v: None)
        >>> operating_points(nn.Identity(), [a, b])[:2]
        [(('a', 0.5), ('b', 0.0)), (('a', 0.5), ('b', 0.4))]
    """
    present = [(k.name, k.levels(model)) for k in (KNOBS if knobs is None else knobs)]
    present = [(name, levels) for name, levels in present if levels]
    if not present:
        return []
    return [tuple(zip((name for name, _ in present), values))
            for values in itertools.product(*(levels for _, levels in present))]


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


class AdaptiveController:
    """Runs `model` at its current operating point, records each call's latency and adapts.

    `target_ms`: the latency to keep under; `levels`: the operating points to use (default: every
    combination of the model's registered knobs' stored levels); `signal`: optional callable returning
    a ceiling in (0, 1] on the relative cost of the point to use (1: any). `costs` (point -> ms) skips
    the calibration. `level` is the current point as a dict, `history` the (latency_ms, point) of every
    call. See the module docstring.
    """

    def __init__(self, model: nn.Module, target_ms: float, levels: Sequence[PointKey] | None = None,
                 signal: Callable[[], float] | None = None, *, knobs: Sequence[Knob] | None = None,
                 costs: dict[PointKey, float] | None = None, window: int = 16, percentile: float = 90.0,
                 headroom: float = 0.85, dwell: int = 4, calibration_calls: int = 5,
                 clock: Callable[[], float] = time.perf_counter):
        if target_ms <= 0:
            raise ValueError(f"target_ms must be > 0, got {target_ms}")
        self.model, self.target_ms, self.signal = model, float(target_ms), signal
        self.knobs = {k.name: k for k in (KNOBS if knobs is None else knobs)}
        points = list(levels) if levels is not None else operating_points(model, list(self.knobs.values()))
        if not points:
            raise ValueError("the model has no runtime operating points (no elastic or activation levels stored)")
        unknown = sorted({name for point in points for name, _ in point} - set(self.knobs))
        if unknown:
            raise ValueError(f"operating points name unknown knobs {unknown}; known: {sorted(self.knobs)}")
        self._points = points
        self._costs = dict(costs) if costs is not None else None
        self.window, self.percentile, self.headroom, self.dwell = window, percentile, headroom, dwell
        self.calibration_calls, self.clock = calibration_calls, clock
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=window)
        self._since_switch = 0
        self._applied: PointKey | None = None
        self.history: list[tuple[float, dict[str, float]]] = []
        self._order: list[PointKey] = []
        self._index = 0
        if self._costs is not None:
            self._set_order()

    @property
    def level(self) -> dict[str, float]:
        """The current operating point (knob -> level)."""
        return dict(self._order[self._index]) if self._order else dict(self._points[0])

    @property
    def points(self) -> list[tuple[dict[str, float], float]]:
        """The operating points from most to least expensive, with their calibrated cost in ms."""
        return [(dict(p), self._costs[p]) for p in self._order] if self._costs else []

    def __call__(self, *args: Any, **inputs: Any) -> Any:
        with self._lock:
            if self._costs is None:
                self._calibrate(args, inputs)
            point = self._order[self._index]
            if point != self._applied:
                self._apply(point)
        start = self.clock()
        out = self.model(*args, **inputs)
        elapsed_ms = (self.clock() - start) * 1000.0
        with self._lock:
            self.history.append((elapsed_ms, dict(point)))
            if point == self._order[self._index]:  # a call that ran at an older point says nothing new
                self._recent.append(elapsed_ms)
                self._since_switch += 1
                self._decide()
        return out

    def _apply(self, point: PointKey) -> None:
        for name, value in point:
            self.knobs[name].apply(self.model, value)
        self._applied = point

    def _calibrate(self, args: tuple[Any, ...], inputs: dict[str, Any]) -> None:
        costs = {}
        for point in self._points:
            self._apply(point)
            self.model(*args, **inputs)  # warm-up: first calls at a level prepare its kernels
            samples = []
            for _ in range(self.calibration_calls):
                start = self.clock()
                self.model(*args, **inputs)
                samples.append((self.clock() - start) * 1000.0)
            costs[point] = sorted(samples)[len(samples) // 2]
        self._costs = costs
        self._set_order()

    def _set_order(self) -> None:
        assert self._costs is not None
        missing = [p for p in self._points if p not in self._costs]
        if missing:
            raise ValueError(f"no cost given for operating points {missing}")
        # Cheaper points are the less accurate ones; most expensive first.
        self._order = sorted(self._points, key=lambda p: -self._costs[p])  # type: ignore[index]
        self._index = 0

    def _ceiling_index(self) -> int:
        """The dearest point the resource signal allows (0 without a signal)."""
        if self.signal is None:
            return 0
        ceiling = max(0.0, min(1.0, float(self.signal())))
        top = self._costs[self._order[0]]  # type: ignore[index]
        allowed = [i for i, p in enumerate(self._order) if self._costs[p] <= ceiling * top + 1e-12]  # type: ignore[index]
        return allowed[0] if allowed else len(self._order) - 1

    def _move(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self._recent.clear()
            self._since_switch = 0

    def _decide(self) -> None:
        floor = self._ceiling_index()
        if self._index < floor:
            self._move(floor)
            return
        if self._since_switch < self.dwell:
            return
        observed = _percentile(self._recent, self.percentile)
        if observed > self.target_ms and self._index + 1 < len(self._order):
            self._move(self._index + 1)
            return
        if self._index > floor and len(self._recent) == self.window:
            costs = self._costs
            assert costs is not None
            # how much slower than calibrated the machine runs now (medians against the calibrated median)
            slowdown = _percentile(self._recent, 50.0) / costs[self._order[self._index]]
            predicted = costs[self._order[self._index - 1]] * slowdown
            if predicted < self.headroom * self.target_ms:
                self._move(self._index - 1)


def cpu_signal(min_ceiling: float = 0.25, every_s: float = 0.25) -> Callable[[], float]:
    """A signal from psutil: the share of the CPUs that other processes leave free (sampled at most every
    `every_s` seconds), never below `min_ceiling`.

    Example:
        >>> signal = cpu_signal()
        >>> 0.25 <= signal() <= 1.0
        True
    """
    import psutil

    me = psutil.Process()
    me.cpu_percent(None)
    psutil.cpu_percent(None)
    count = psutil.cpu_count() or 1
    state = {"at": 0.0, "value": 1.0}

    def read() -> float:
        now = time.monotonic()
        if now - state["at"] >= every_s:
            total = psutil.cpu_percent(None) / 100.0 * count  # busy cores, all processes
            own = me.cpu_percent(None) / 100.0               # busy cores, this process
            others = max(0.0, total - own)
            state["value"] = max(min_ceiling, min(1.0, 1.0 - others / count))
            state["at"] = now
        return state["value"]

    return read


def memory_signal(low: float = 0.05, high: float = 0.25) -> Callable[[], float]:
    """A signal from psutil: 1 while at least `high` of memory is available, falling linearly to 0.25
    at `low` and below (cheaper points hold less memory in use per call).

    Example:
        >>> 0.25 <= memory_signal()() <= 1.0
        True
    """
    import psutil

    def read() -> float:
        available = psutil.virtual_memory().available / psutil.virtual_memory().total
        if available >= high:
            return 1.0
        if available <= low:
            return 0.25
        return 0.25 + 0.75 * (available - low) / (high - low)

    return read


def battery_signal(low_percent: float = 20.0) -> Callable[[], float]:
    """A signal from psutil: 1 on mains power (or without a battery), 0.5 on battery, 0.25 below
    `low_percent` on battery.

    Example:
        >>> battery_signal()() in (1.0, 0.5, 0.25)
        True
    """
    import psutil

    def read() -> float:
        battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if battery is None or battery.power_plugged:
            return 1.0
        return 0.25 if battery.percent < low_percent else 0.5

    return read


__all__ = ["KNOBS", "AdaptiveController", "Knob", "battery_signal", "cpu_signal", "memory_signal",
           "operating_points", "register_knob"]
