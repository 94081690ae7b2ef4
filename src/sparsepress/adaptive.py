"""A controller that keeps a model's latency on target by moving between its runtime operating points.

An operating point fixes every runtime knob the model has (its elastic sparsity level, its activation
sparsity level, the thread count, ...; each knob is registered by the module that implements it with
`register_knob`). The controller measures what each point costs (a short calibration on the first
call's inputs, or given `costs`). The accuracy knobs' combinations form a ladder ordered from most to
least expensive (most to least accurate); each rung runs at the cheapest measured thread count allowed
by the current thread cap (all threads to start with). It starts at the most accurate rung, and after
every call compares a moving percentile of the observed latency with the target:
- above the target: one rung cheaper at once (after a short dwell, so one slow call cannot run it down);
  but when even the cheapest rung, slowed down as much as the current one's median is, would miss the
  target, the cause is contention no rung spans (threads descheduled at the kernels' barriers): the
  thread cap drops one step, starting again from the cheapest rung;
- comfortably below: one rung dearer, but only when the dearer point's cost, scaled by how much slower
  than calibrated the machine runs right now, is predicted to stay under `headroom` x target, and only
  after a full window at the current point (hysteresis: it does not oscillate);
- under a lowered cap, once a full window ran at about calibrated speed (no sign of contention), the
  next higher cap is probed; a call in the probe's first `dwell` that runs far slower than calibrated
  sends it back at once, and the wait before the next probe doubles (`probe_after_s`, up to `probe_max_s`);
- an optional `signal()` (a resource reading mapped to a ceiling in (0, 1], e.g. the CPU share other
  processes leave us, see `cpu_signal`) caps the threads at the cores it leaves (a quarter core of
  slack) and rules out points dearer than the share left per thread, at once.

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
    """One runtime knob: its stored levels on a model (empty: the model has none) and how to set one.

    `threads`: the levels are thread counts, which change speed only, never outputs; the controller
    spends no accuracy on them but runs each rung at the fastest count the contention allows.
    """

    name: str
    levels: Callable[[nn.Module], list[float]]
    apply: Callable[[nn.Module, float], None]
    threads: bool = False


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


# A thread count is allowed by the signal when the other processes leave that many cores less this.
CORE_SLACK = 0.25
# A full window at a lowered thread cap with a median at most this much over calibrated cost counts as
# calm: no sign of contention at this cap, so the next higher one is worth a probe.
CALM_SLOWDOWN = 1.25
# A probe of more threads fails on any of its first `dwell` calls that runs this many times its point's
# calibrated cost: longer requests than the calibration's run up to ~2-3x it unloaded (MiniLM, 16-64
# tokens), calls stalled at the barriers of descheduled threads 10x and more (one in a few under a hog).
PROBE_SLOWDOWN = 3.0


class AdaptiveController:
    """Runs `model` at its current operating point, records each call's latency and adapts.

    `target_ms`: the latency to keep under; `levels`: the operating points to use (default: every
    combination of the model's registered knobs' stored levels; with `costs` that name no thread count,
    the thread knob is left out); `signal`: optional callable returning a ceiling in (0, 1] on the
    CPU share to use (1: any). `costs` (point -> ms) skips the calibration. `level` is the current point
    as a dict, `history` the (latency_ms, point) of every call. See the module docstring.
    """

    def __init__(self, model: nn.Module, target_ms: float, levels: Sequence[PointKey] | None = None,
                 signal: Callable[[], float] | None = None, *, knobs: Sequence[Knob] | None = None,
                 costs: dict[PointKey, float] | None = None, window: int = 16, percentile: float = 90.0,
                 headroom: float = 0.85, dwell: int = 4, calibration_calls: int = 5,
                 probe_after_s: float = 0.25, probe_max_s: float = 2.0,
                 clock: Callable[[], float] = time.perf_counter):
        if target_ms <= 0:
            raise ValueError(f"target_ms must be > 0, got {target_ms}")
        self.model, self.target_ms, self.signal = model, float(target_ms), signal
        self.knobs = {k.name: k for k in (KNOBS if knobs is None else knobs)}
        thread_knobs = {name for name, k in self.knobs.items() if k.threads}
        if levels is not None:
            points = list(levels)
        else:
            points = operating_points(model, list(self.knobs.values()))
            if costs is not None and not any(name in thread_knobs for point in costs for name, _ in point):
                points = [p for p in dict.fromkeys(tuple(kv for kv in p if kv[0] not in thread_knobs)
                                                   for p in points) if p]
        if not points:
            raise ValueError("the model has no runtime operating points (no elastic or activation levels stored)")
        unknown = sorted({name for point in points for name, _ in point} - set(self.knobs))
        if unknown:
            raise ValueError(f"operating points name unknown knobs {unknown}; known: {sorted(self.knobs)}")
        self._points = points
        self._thread_knob = next((name for name in thread_knobs if any(name == n for p in points for n, _ in p)),
                                 None)
        # thread caps, most threads first ([None]: the points fix no thread count)
        counts = {dict(p).get(self._thread_knob) for p in points} if self._thread_knob else {None}
        self._caps: list[float | None] = sorted(counts, key=lambda t: -(t or 0.0))
        self._costs = dict(costs) if costs is not None else None
        self.window, self.percentile, self.headroom, self.dwell = window, percentile, headroom, dwell
        self.calibration_calls, self.clock = calibration_calls, clock
        self.probe_after_s, self.probe_max_s = probe_after_s, probe_max_s
        self._lock = threading.Lock()
        self._recent: deque[float] = deque(maxlen=window)
        self._since_switch = 0
        self._applied: PointKey | None = None
        self.history: list[tuple[float, dict[str, float]]] = []
        self._order: list[PointKey] = []
        self._index = 0
        self._cap = 0
        self._backoff = probe_after_s
        self._probe_at = 0.0
        self._probation = 0  # calls left in which a probe of more threads can still fail
        if self._costs is not None:
            self._set_order()

    @property
    def level(self) -> dict[str, float]:
        """The current operating point (knob -> level)."""
        return dict(self._order[self._index]) if self._order else dict(self._points[0])

    @property
    def points(self) -> list[tuple[dict[str, float], float]]:
        """Every operating point from most to least expensive, with its calibrated cost in ms."""
        costs = self._costs
        return [(dict(p), costs[p]) for p in sorted(self._points, key=lambda p: -costs[p])] if costs else []

    @property
    def ladder(self) -> list[dict[str, float]]:
        """The points the controller moves between now (one per rung at the current thread cap), dearest first."""
        return [dict(p) for p in self._order]

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
                self._decide(elapsed_ms)
        return out

    def _apply(self, point: PointKey) -> None:
        for name, value in point:
            self.knobs[name].apply(self.model, value)
        self._applied = point

    def _calibrate(self, args: tuple[Any, ...], inputs: dict[str, Any]) -> None:
        for point in self._points:
            self._apply(point)
            self.model(*args, **inputs)  # warm-up: first calls at a level prepare its kernels
        samples: dict[PointKey, list[float]] = {point: [] for point in self._points}
        # rounds over all points, so a burst of other work skews every point a little, not one point much
        for _ in range(self.calibration_calls):
            for point in self._points:
                self._apply(point)
                start = self.clock()
                self.model(*args, **inputs)
                samples[point].append((self.clock() - start) * 1000.0)
        self._costs = {point: sorted(ms)[len(ms) // 2] for point, ms in samples.items()}
        self._set_order()

    def _set_order(self) -> None:
        assert self._costs is not None
        missing = [p for p in self._points if p not in self._costs]
        if missing:
            raise ValueError(f"no cost given for operating points {missing}")
        self._cap = 0
        self._order = self._ladder(0)
        self._index = 0

    def _threads(self, point: PointKey) -> float | None:
        return dict(point).get(self._thread_knob) if self._thread_knob else None

    def _rung(self, point: PointKey) -> PointKey:
        return tuple(kv for kv in point if kv[0] != self._thread_knob)

    def _ladder(self, cap: int) -> list[PointKey]:
        """One point per rung, at its cheapest thread count within cap `cap`; most expensive first."""
        costs = self._costs
        assert costs is not None
        limit = self._caps[cap]
        fastest: dict[PointKey, PointKey] = {}
        for point in self._points:
            threads = self._threads(point)
            if limit is not None and threads is not None and threads > limit:
                continue
            rung = self._rung(point)
            if rung not in fastest or costs[point] < costs[fastest[rung]]:
                fastest[rung] = point
        # Cheaper rungs are the less accurate ones; most expensive first.
        return sorted(fastest.values(), key=lambda p: -costs[p])

    def _set_cap(self, cap: int, rung: PointKey | None) -> None:
        """Move to thread cap `cap` at `rung` (None: the cheapest rung)."""
        self._cap = cap
        self._order = self._ladder(cap)
        self._index = next((i for i, p in enumerate(self._order) if self._rung(p) == rung), len(self._order) - 1)
        self._recent.clear()
        self._since_switch = 0

    def _signal_caps(self, value: float | None) -> tuple[int, int]:
        """(the fewest-threads cap index the signal asks for, the dearest ladder index it allows)."""
        if value is None:
            return 0, 0
        most = self._caps[0] or 1.0
        cap = 0
        while cap + 1 < len(self._caps) and (self._caps[cap] or 1.0) > value * most + CORE_SLACK:
            cap += 1
        threads = self._caps[max(cap, self._cap)] or 1.0
        share = min(1.0, value * most / threads)  # of a core, per thread we run
        costs = self._costs
        assert costs is not None
        top = costs[self._order[0]]
        allowed = [i for i, p in enumerate(self._order) if costs[p] <= share * top + 1e-12]
        return cap, allowed[0] if allowed else len(self._order) - 1

    def _move(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self._recent.clear()
            self._since_switch = 0

    def _decide(self, elapsed_ms: float) -> None:
        costs = self._costs
        assert costs is not None
        now = self.clock()
        value = None if self.signal is None else max(0.0, min(1.0, float(self.signal())))
        signal_cap, _ = self._signal_caps(value)
        if self._cap < signal_cap:  # other processes take the cores our threads would run on
            self._set_cap(signal_cap, self._rung(self._order[self._index]))
            self._probe_at, self._probation = now + self._backoff, 0
        _, floor = self._signal_caps(value)
        if self._index < floor:
            self._move(floor)
            return
        if self._probation:  # the first `dwell` calls after raising the thread cap decide whether it stays
            self._probation -= 1
            if elapsed_ms > PROBE_SLOWDOWN * costs[self._order[self._index]]:
                self._probation = 0
                self._backoff = min(2.0 * self._backoff, self.probe_max_s)
                self._probe_at = now + self._backoff
                self._set_cap(self._cap + 1, self._rung(self._order[self._index]))
                return
            if not self._probation:
                self._backoff = self.probe_after_s
        if self._since_switch < self.dwell:
            return
        current = self._order[self._index]
        # how much slower than calibrated the machine runs now (medians against the calibrated median)
        slowdown = _percentile(self._recent, 50.0) / costs[current]
        full = len(self._recent) == self.window
        if self._cap > signal_cap and full and slowdown <= CALM_SLOWDOWN and now >= self._probe_at:
            self._set_cap(self._cap - 1, self._rung(current))  # no sign of contention here: try more threads
            self._probation = max(1, self.dwell)
            return
        if _percentile(self._recent, self.percentile) > self.target_ms:
            if self._cap + 1 < len(self._caps) and costs[self._order[-1]] * slowdown > self.target_ms:
                self._set_cap(self._cap + 1, None)  # contention no rung spans: fewer threads, cheapest rung
                self._probe_at = now + self._backoff
            elif self._index + 1 < len(self._order):
                self._move(self._index + 1)
            return
        if full and self._index > floor:
            predicted = costs[self._order[self._index - 1]] * slowdown
            if predicted < self.headroom * self.target_ms:
                self._move(self._index - 1)


def cpu_signal(min_ceiling: float = 0.25, every_s: float = 0.25) -> Callable[[], float]:
    """A signal from psutil: the share of the CPUs that other processes leave free (sampled at most every
    `every_s` seconds), never below `min_ceiling`.

    Time the hypervisor steals counts as taken. Niced processes' time counts only when this process is
    niced itself: at nice 19 a background build gets ~1.5% of a core against us however busy it looks,
    and it soaks up every core our calls leave idle (at one thread, the other core), which would read as
    contention that never ends.

    Example:
        >>> signal = cpu_signal()
        >>> 0.25 <= signal() <= 1.0
        True
    """
    import psutil

    me = psutil.Process()
    count = psutil.cpu_count() or 1
    niced = me.nice() > 0

    def sample() -> tuple[float, float, float]:
        t = psutil.cpu_times()
        taken = t.user + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)
        own = me.cpu_times()
        return time.monotonic(), taken + (t.nice if niced else 0.0), own.user + own.system

    state = {"last": sample(), "value": 1.0}

    def read() -> float:
        last = state["last"]
        now = time.monotonic()
        if now - last[0] >= every_s:
            current = sample()
            wall = current[0] - last[0]
            others = max(0.0, (current[1] - last[1]) - (current[2] - last[2])) / wall  # cores taken by others
            state["value"] = max(min_ceiling, min(1.0, 1.0 - others / count))
            state["last"] = current
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
