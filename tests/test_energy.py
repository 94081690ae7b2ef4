"""Energy per inference: RAPL through a fake powercap tree (zones, wrap-around, permissions) and the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sparsepress import SparseLinear
from sparsepress.energy import (
    EnergyUnavailable,
    InferenceCost,
    RaplMeter,
    counter_delta,
    energy_per_inference,
    estimate_energy,
    find_rapl_zones,
    linear_cost,
)


def _zone(root: Path, name: str, label: str, energy: int, max_range: int = 1_000_000) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "name").write_text(label + "\n")
    (path / "energy_uj").write_text(f"{energy}\n")
    (path / "max_energy_range_uj").write_text(f"{max_range}\n")
    return path


def test_zones_sum_packages_and_dram_never_psys_twice(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 10)
    _zone(tmp_path, "intel-rapl:0:0", "core", 5)
    _zone(tmp_path, "intel-rapl:0:1", "dram", 7)
    _zone(tmp_path, "intel-rapl:1", "psys", 99)
    assert [z.name for z in find_rapl_zones(tmp_path)] == ["package-0", "dram"]


def test_psys_alone_is_used(tmp_path):
    _zone(tmp_path, "intel-rapl:1", "psys", 99)
    assert [z.name for z in find_rapl_zones(tmp_path)] == ["psys"]


def test_counter_wrap_is_handled(tmp_path):
    assert counter_delta(999_990, 20, 1_000_000) == 31
    package = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000, max_range=1_000_000)
    meter = RaplMeter(tmp_path)
    before = meter.read()
    (package / "energy_uj").write_text("500\n")  # wrapped past max_energy_range_uj
    assert meter.joules_between(before, meter.read()) == pytest.approx(1501 / 1e6)


def test_measure_divides_by_calls(tmp_path):
    package = _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    meter = RaplMeter(tmp_path)
    counter = [0]

    def run() -> None:  # each call "spends" 2000 uJ
        counter[0] += 2000
        (package / "energy_uj").write_text(f"{counter[0]}\n")

    assert meter.measure(run, repeats=10, min_seconds=0.0) == pytest.approx(0.002)


def test_missing_or_root_only_counters_fall_back_to_a_labelled_estimate(tmp_path, monkeypatch):
    with pytest.raises(EnergyUnavailable, match="no RAPL"):
        RaplMeter(tmp_path)
    _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    real = Path.read_text

    def root_only(self: Path, *a, **k):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", root_only)
    with pytest.raises(EnergyUnavailable, match="root only"):
        RaplMeter(tmp_path)
    model = nn.Linear(16, 16)
    reading = energy_per_inference(lambda: model(torch.ones(1, 16)), model, tokens=1, seconds=1e-4, root=tmp_path)
    assert reading.source == "estimate" and "root only" in reading.label


def test_rapl_reading_is_used_when_readable(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    model = nn.Linear(4, 4)
    reading = energy_per_inference(lambda: model(torch.ones(1, 4)), model, tokens=1, seconds=1e-5, root=tmp_path)
    assert reading.source == "rapl" and reading.joules == 0.0  # the fake counter never moves


def test_estimate_follows_bytes_and_macs_and_sparsity_saves_energy():
    dense = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        dense.weight.copy_(torch.sign(torch.randn(64, 64)) * (1 + torch.rand(64, 64)))  # no int8 rounds to 0
        dense.weight[:, ::2] = 0.0  # 50% zeros
    packed = nn.Sequential(SparseLinear.from_linear(dense, format="bitmask", dtype="int8"))
    moved_dense, fp32, int8 = linear_cost(nn.Sequential(dense), tokens=4)
    assert (fp32, int8) == (4 * 64 * 64, 0)
    moved_packed, fp32_p, int8_p = linear_cost(packed, tokens=4)
    assert fp32_p == 0 and int8_p == 4 * 64 * 32 and moved_packed < moved_dense
    cheap = estimate_energy(InferenceCost(moved_packed, fp32_p, int8_p, seconds=0.0))
    dear = estimate_energy(InferenceCost(moved_dense, fp32, int8, seconds=0.0))
    assert 0 < cheap.joules < dear.joules and cheap.source == "estimate"
    assert estimate_energy(InferenceCost(0, 0, 0, seconds=1.0, cores=2)).joules == pytest.approx(4.0)
