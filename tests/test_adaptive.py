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
