"""The runtime controller on scripted latency traces: no real timing, a fake clock the model advances."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from sparsepress.adaptive import AdaptiveController, Knob, cpu_signal, memory_signal, operating_points


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ScriptedModel(nn.Module):
    """A model whose forward takes `base_ms[level] * load` on the fake clock."""

    def __init__(self, clock: FakeClock, base_ms: dict[float, float]):
        super().__init__()
        self.clock, self.base_ms, self.level, self.load = clock, base_ms, min(base_ms), 1.0
        self.levels_seen: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.levels_seen.append(self.level)
        self.clock.now += self.base_ms[self.level] * self.load / 1000.0
        return x


def _knob() -> Knob:
    return Knob("sparsity", levels=lambda m: sorted(m.base_ms), apply=lambda m, v: setattr(m, "level", v))


BASE = {0.5: 10.0, 0.7: 7.0, 0.9: 4.0}


def _controller(model: ScriptedModel, clock: FakeClock, **kw) -> AdaptiveController:
    return AdaptiveController(model, target_ms=13.0, knobs=[_knob()], clock=clock, **kw)


def test_calibration_orders_points_by_measured_cost():
    clock = FakeClock()
    model = ScriptedModel(clock, BASE)
    ctl = _controller(model, clock)
    ctl(torch.ones(1))
    assert [p["sparsity"] for p, _ in ctl.points] == [0.5, 0.7, 0.9]
    assert [cost for _, cost in ctl.points] == pytest.approx([10.0, 7.0, 4.0])
    assert ctl.level == {"sparsity": 0.5}  # starts at the most accurate point


def test_steps_down_under_load_and_back_up_when_it_ends():
    clock = FakeClock()
    model = ScriptedModel(clock, BASE)
    ctl = _controller(model, clock, costs={(("sparsity", s),): ms for s, ms in BASE.items()})
    for _ in range(40):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5}  # 10 ms < 13 ms target: no reason to move
    model.load = 2.0  # a CPU hog halves our speed: 20 / 14 / 8 ms
    for _ in range(60):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.9}
    recent = [ms for ms, _ in ctl.history[-30:]]
    assert max(recent) <= 13.0  # settled under the target
    model.load = 1.0
    for _ in range(80):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5}


def test_no_oscillation_near_the_boundary():
    clock = FakeClock()
    model = ScriptedModel(clock, BASE)
    ctl = _controller(model, clock, costs={(("sparsity", s),): ms for s, ms in BASE.items()})
    model.load = 1.5  # 15 / 10.5 / 6 ms: 0.7 fits the 13 ms target, 0.5 does not
    for _ in range(300):
        ctl(torch.ones(1))
    levels = [p["sparsity"] for _, p in ctl.history]
    switches = sum(a != b for a, b in zip(levels, levels[1:]))
    assert ctl.level == {"sparsity": 0.7}
    assert switches <= 2, levels  # one step down, then it stays: going up is predicted to miss


def test_signal_ceiling_rules_out_dear_points_at_once():
    clock = FakeClock()
    model = ScriptedModel(clock, BASE)
    ceiling = [1.0]
    ctl = _controller(model, clock, signal=lambda: ceiling[0],
                      costs={(("sparsity", s),): ms for s, ms in BASE.items()})
    ctl(torch.ones(1))
    ceiling[0] = 0.5  # at most half the dearest point's cost: only 0.9 (4 ms) qualifies
    ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.9}
    ctl(torch.ones(1))
    assert model.levels_seen[-1] == 0.9


def test_concurrent_calls_are_all_recorded():
    clock = FakeClock()
    model = ScriptedModel(clock, BASE)
    ctl = _controller(model, clock, costs={(("sparsity", s),): ms for s, ms in BASE.items()})
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(50):
                ctl(torch.ones(1))
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(ctl.history) == 200


def test_operating_points_combine_knobs_and_errors_name_the_problem():
    a = Knob("a", levels=lambda m: [0.5, 0.9], apply=lambda m, v: None)
    b = Knob("b", levels=lambda m: [0.0, 0.25, 0.4], apply=lambda m, v: None)
    none = Knob("c", levels=lambda m: [], apply=lambda m, v: None)
    assert len(operating_points(nn.Identity(), [a, b, none])) == 6
    with pytest.raises(ValueError, match="no runtime operating points"):
        AdaptiveController(nn.Identity(), 5.0, knobs=[none])
    with pytest.raises(ValueError, match="unknown knobs"):
        AdaptiveController(nn.Identity(), 5.0, levels=[(("z", 1.0),)], knobs=[a])
    with pytest.raises(ValueError, match="target_ms"):
        AdaptiveController(nn.Identity(), 0.0, knobs=[a])


def test_psutil_signals_stay_in_range():
    for signal in (cpu_signal(), memory_signal()):
        assert 0.25 <= signal() <= 1.0


class ThreadedModel(nn.Module):
    """A scripted model with a thread count: a forward takes `base_ms[(level, threads)] * load[threads]`."""

    def __init__(self, clock: FakeClock, base_ms: dict[tuple[float, float], float]):
        super().__init__()
        self.clock, self.base_ms = clock, base_ms
        self.level, self.threads = 0.5, 2.0
        self.load = {1.0: 1.0, 2.0: 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.base_ms[(self.level, self.threads)] * self.load[self.threads] / 1000.0
        return x


# 2 threads are faster unloaded; under a hog a 2-thread call stalls at its barriers (x30), a 1-thread one
# only shares its core (x1.4): no sparsity level spans x30.
BASE_THREADS = {(0.5, 2.0): 10.0, (0.7, 2.0): 7.0, (0.9, 2.0): 4.0,
                (0.5, 1.0): 16.0, (0.7, 1.0): 11.0, (0.9, 1.0): 6.0}
HOG = {1.0: 1.4, 2.0: 30.0}


def _threaded(clock: FakeClock, **kw) -> tuple[ThreadedModel, AdaptiveController]:
    model = ThreadedModel(clock, BASE_THREADS)
    knobs = [Knob("sparsity", levels=lambda m: [0.5, 0.7, 0.9], apply=lambda m, v: setattr(m, "level", v)),
             Knob("threads", levels=lambda m: [1.0, 2.0], apply=lambda m, v: setattr(m, "threads", v), threads=True)]
    return model, AdaptiveController(model, target_ms=13.0, knobs=knobs, clock=clock, **kw)


def _points(ctl: AdaptiveController, since: int = 0) -> list[tuple[float, float]]:
    return [(p["sparsity"], p["threads"]) for _, p in ctl.history[since:]]


def test_thread_points_are_calibrated_and_each_rung_runs_at_its_fastest_count():
    clock = FakeClock()
    _, ctl = _threaded(clock)
    ctl(torch.ones(1))
    assert len(ctl.points) == 6 and ctl.points[0] == ({"sparsity": 0.5, "threads": 1.0}, pytest.approx(16.0))
    assert ctl.ladder == [{"sparsity": 0.5, "threads": 2.0}, {"sparsity": 0.7, "threads": 2.0},
                          {"sparsity": 0.9, "threads": 2.0}]
    assert ctl.level == {"sparsity": 0.5, "threads": 2.0}


def test_contention_drops_to_one_thread_and_comes_back_when_it_ends():
    clock = FakeClock()
    model, ctl = _threaded(clock, costs={(("sparsity", s), ("threads", t)): ms for (s, t), ms in BASE_THREADS.items()})
    for _ in range(30):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5, "threads": 2.0}
    model.load = dict(HOG)
    start = len(ctl.history)
    for _ in range(200):
        ctl(torch.ones(1))
    hog = _points(ctl, start)
    # a few calls at 2 threads (one rung down while the window still holds unloaded calls, then a dwell
    # whose median shows x30), then 1 thread: the cheaper rungs at 2 threads would not have helped
    first = next(i for i, (_, t) in enumerate(hog) if t == 1.0)
    assert 1 <= first <= 8 and all(t == 2.0 for _, t in hog[:first]) and all(t == 1.0 for _, t in hog[first:])
    assert max(ms for ms, _ in ctl.history[-100:]) <= 13.0
    model.load = {1.0: 1.0, 2.0: 1.0}
    for _ in range(200):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5, "threads": 2.0}


def test_a_uniform_slowdown_moves_the_rungs_not_the_threads():
    clock = FakeClock()
    model, ctl = _threaded(clock, costs={(("sparsity", s), ("threads", t)): ms for (s, t), ms in BASE_THREADS.items()})
    model.load = {1.0: 1.5, 2.0: 1.5}  # a slower machine: 15 / 10.5 / 6 ms at 2 threads
    for _ in range(300):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.7, "threads": 2.0}
    assert all(t == 2.0 for _, t in _points(ctl))


def test_failed_probes_back_off():
    clock = FakeClock()
    model, ctl = _threaded(clock, costs={(("sparsity", s), ("threads", t)): ms for (s, t), ms in BASE_THREADS.items()})
    model.load = {1.0: 1.0, 2.0: 30.0}  # one hog on two cores: 1 thread runs at full speed, 2 threads stall
    for _ in range(3000):
        ctl(torch.ones(1))
    points = _points(ctl)
    probes = [i for i, (_, t) in enumerate(points) if t == 2.0 and i > 4]
    # waits of 0.25, 0.5, 1, then 2 s (probe_max_s) between probes: one probe per 2 s of scripted time
    assert 3 <= len(probes) <= 3 + clock.now / 2.0
    assert all(points[i + 1][1] == 1.0 for i in probes if i + 1 < len(points))  # each probe goes back at once
    assert ctl.level == {"sparsity": 0.7, "threads": 1.0}  # 0.7 fits at full single-thread speed, 0.5 does not


def test_cpu_signal_caps_the_threads_at_once():
    clock = FakeClock()
    share = [1.0]
    model, ctl = _threaded(clock, signal=lambda: share[0],
                           costs={(("sparsity", s), ("threads", t)): ms for (s, t), ms in BASE_THREADS.items()})
    ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5, "threads": 2.0}
    share[0], model.load = 0.25, dict(HOG)  # two busy processes on two cores
    ctl(torch.ones(1))  # this call ran at 2 threads; the next one does not
    # one thread gets at most half a core's worth of the share left: rungs up to half the dearest 1-thread cost
    assert ctl.level == {"sparsity": 0.9, "threads": 1.0}
    start = len(ctl.history)
    for _ in range(100):
        ctl(torch.ones(1))
    assert all(t == 1.0 for _, t in _points(ctl, start))
    share[0], model.load = 1.0, {1.0: 1.0, 2.0: 1.0}
    for _ in range(200):
        ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5, "threads": 2.0}


def test_costs_without_thread_counts_leave_the_threads_alone():
    clock = FakeClock()
    model = ThreadedModel(clock, BASE_THREADS)
    knobs = [Knob("sparsity", levels=lambda m: [0.5, 0.9], apply=lambda m, v: setattr(m, "level", v)),
             Knob("threads", levels=lambda m: [1.0, 2.0], apply=lambda m, v: setattr(m, "threads", v), threads=True)]
    ctl = AdaptiveController(model, 13.0, knobs=knobs, clock=clock, costs={(("sparsity", 0.5),): 10.0,
                                                                          (("sparsity", 0.9),): 4.0})
    ctl(torch.ones(1))
    assert ctl.level == {"sparsity": 0.5} and model.threads == 2.0
