"""Joules per inference: measured through RAPL where the machine exposes it, else an estimate.

RAPL (Intel since Sandy Bridge, AMD since Zen) counts energy in microjoules in
`/sys/class/powercap/intel-rapl:N/energy_uj`, wrapping at `max_energy_range_uj`. The package zones
(`package-*`) and their `dram` subzones are summed; a `psys` (whole platform) zone is used only when
there is no package zone, so nothing is counted twice. Many machines do not expose it (most VMs), and
recent kernels make `energy_uj` readable by root only: then the reading is an *estimate* from the bytes
an inference moves and the multiply-adds it does, with the constants below, and every output says so.

Estimate constants (order-of-magnitude figures, documented so a reader can redo the arithmetic):
- `DRAM_PJ_PER_BYTE = 160`: a DRAM read costs about 20 pJ per bit (Horowitz, "Computing's energy
  problem", ISSCC 2014: 1.3-2.6 nJ per 64-bit access at 45 nm; DDR4/5 interfaces ~10-20 pJ/bit).
- `FP32_PJ_PER_MAC = 20`, `INT8_PJ_PER_MAC = 4`: arithmetic plus the register-file and pipeline
  energy a SIMD lane spends per multiply-add on a server core (the 45 nm arithmetic alone is 4.6 pJ
  for fp32 and 0.23 pJ for int8; the core's overheads dominate and scale the two alike).
- `STATIC_WATTS_PER_CORE = 2.0`: leakage and uncore power attributed to each busy core for the
  duration of the inference.

Example:
    >>> cost = InferenceCost(bytes_moved=1_000_000, fp32_macs=0, int8_macs=10_000_000, seconds=0.001, cores=2)
    >>> reading = estimate_energy(cost)
    >>> reading.source, round(reading.joules, 6)
    ('estimate', 0.0042)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

POWERCAP_ROOT = Path("/sys/class/powercap")
DRAM_PJ_PER_BYTE = 160.0
FP32_PJ_PER_MAC = 20.0
INT8_PJ_PER_MAC = 4.0
STATIC_WATTS_PER_CORE = 2.0


class EnergyUnavailable(RuntimeError):
    """RAPL cannot be read here; the message says why (absent, or permission denied)."""


@dataclass(frozen=True)
class EnergyReading:
    """Joules per inference and where the figure comes from ("rapl" or "estimate"), with a note.

    Example:
        >>> EnergyReading(0.5, "estimate", "no RAPL").label
        '0.5000 J (estimate: no RAPL)'
    """

    joules: float
    source: str
    note: str = ""

    @property
    def label(self) -> str:
        """The figure with its source, as every output prints it."""
        return f"{self.joules:.4f} J ({self.source}{': ' + self.note if self.note else ''})"


@dataclass(frozen=True)
class RaplZone:
    """One powercap energy counter: its folder, name and wrap-around range (microjoules)."""

    path: Path
    name: str
    max_range_uj: int

    def read_uj(self) -> int:
        """The counter now (EnergyUnavailable when it cannot be read)."""
        try:
            return int((self.path / "energy_uj").read_text().strip())
        except PermissionError:
            raise EnergyUnavailable(f"{self.path / 'energy_uj'} is not readable (root only on this kernel); "
                                    "energy is estimated") from None
        except (OSError, ValueError) as exc:
            raise EnergyUnavailable(f"{self.path / 'energy_uj'}: {exc}") from None


def counter_delta(before: int, after: int, max_range_uj: int) -> int:
    """Microjoules between two readings of a counter that wraps to 0 after `max_range_uj`.

    Example:
        >>> counter_delta(100, 250, 1000), counter_delta(900, 50, 1000)
        (150, 151)
    """
    return after - before if after >= before else after + (max_range_uj - before) + 1


def _zone(path: Path) -> RaplZone | None:
    try:
        name = (path / "name").read_text().strip()
        max_range = int((path / "max_energy_range_uj").read_text().strip())
    except (OSError, ValueError):
        return None
    return RaplZone(path, name, max_range) if (path / "energy_uj").exists() else None


def find_rapl_zones(root: Path = POWERCAP_ROOT) -> list[RaplZone]:
    """The zones to sum for whole-system energy: packages and their DRAM subzones (else psys).

    Example:
        >>> find_rapl_zones(Path("/nonexistent"))
        []
    """
    zones = [z for p in sorted(root.glob("intel-rapl:*")) if (z := _zone(p)) is not None]
    top = [z for z in zones if z.path.name.count(":") == 1]
    packages = [z for z in top if z.name.startswith("package")]
    if packages:
        return packages + [z for z in zones if z.path.name.count(":") == 2 and z.name == "dram"]
    return [z for z in top if z.name == "psys"]


class RaplMeter:
    """Measures the energy of a callable through RAPL; EnergyUnavailable when it cannot.

    Example:
        >>> try:
        ...     RaplMeter(Path("/nonexistent"))
        ... except EnergyUnavailable as exc:
        ...     "no RAPL" in str(exc)
        True
    """

    def __init__(self, root: Path = POWERCAP_ROOT):
        self.zones = find_rapl_zones(root)
        if not self.zones:
            raise EnergyUnavailable(f"no RAPL energy counters under {root} (not exposed on this machine); "
                                    "energy is estimated")
        self.read()  # fail now, not mid-measurement, when the counters are root-only

    def read(self) -> list[int]:
        """Every zone's counter now."""
        return [zone.read_uj() for zone in self.zones]

    def joules_between(self, before: list[int], after: list[int]) -> float:
        """Joules spent between two `read()`s (each counter's wrap handled)."""
        return sum(counter_delta(b, a, z.max_range_uj) for z, b, a in zip(self.zones, before, after)) / 1e6

    def measure(self, run: Callable[[], object], repeats: int = 20, min_seconds: float = 0.5) -> float:
        """Joules per call of `run`, over at least `repeats` calls and `min_seconds` (RAPL updates ~1 ms)."""
        run()
        calls, start, before = 0, time.perf_counter(), self.read()
        while calls < repeats or time.perf_counter() - start < min_seconds:
            run()
            calls += 1
        return self.joules_between(before, self.read()) / calls


@dataclass(frozen=True)
class InferenceCost:
    """What one inference moves and computes: bytes from memory, multiply-adds, wall time, cores busy."""

    bytes_moved: int
    fp32_macs: int
    int8_macs: int
    seconds: float
    cores: int = 1


def estimate_energy(cost: InferenceCost, note: str = "") -> EnergyReading:
    """Joules from the documented constants of this module (see the module docstring)."""
    picojoules = (cost.bytes_moved * DRAM_PJ_PER_BYTE + cost.fp32_macs * FP32_PJ_PER_MAC
                  + cost.int8_macs * INT8_PJ_PER_MAC)
    joules = picojoules * 1e-12 + STATIC_WATTS_PER_CORE * cost.cores * cost.seconds
    return EnergyReading(joules, "estimate", note)


def linear_cost(model: nn.Module, tokens: int) -> tuple[int, int, int]:
    """(bytes moved, fp32 MACs, int8 MACs) of every Linear-like layer of `model` for `tokens` tokens:
    each weight read once per forward, inputs and outputs once per token; packed layers count their
    stored bytes and only their kept weights' MACs.

    Example:
        >>> linear_cost(nn.Linear(4, 2, bias=False), tokens=3)
        (104, 24, 0)
    """
    from .nn import SparseLinear

    moved = fp32 = int8 = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            moved += module.nbytes + tokens * (module.in_features + module.out_features) * 4
            macs = tokens * (module.packed.shape[0] * module.packed.shape[1] - _zeros(module))
            if module.packed.dtype in ("int8", "int4"):
                int8 += macs
            else:
                fp32 += macs
        elif isinstance(module, nn.Linear):
            moved += module.weight.numel() * module.weight.element_size() + tokens * (
                module.in_features + module.out_features) * 4
            fp32 += tokens * module.weight.numel()
    return moved, fp32, int8


def _zeros(layer: nn.Module) -> int:
    packed = layer.packed  # type: ignore[attr-defined]
    return round(packed.sparsity * packed.shape[0] * packed.shape[1])


def energy_per_inference(run: Callable[[], object], model: nn.Module, tokens: int, seconds: float,
                         root: Path = POWERCAP_ROOT) -> EnergyReading:
    """Joules per call of `run` (a forward of `model` over `tokens` tokens that takes `seconds`):
    RAPL when readable, else the estimate, labelled as such with the reason.

    Example:
        >>> model = nn.Linear(8, 8)
        >>> reading = energy_per_inference(lambda: model(torch.ones(1, 8)), model, 1, 1e-5, Path("/none"))
        >>> reading.source
        'estimate'
    """
    try:
        return EnergyReading(RaplMeter(root).measure(run), "rapl", "measured: package + DRAM counters")
    except EnergyUnavailable as exc:
        moved, fp32, int8 = linear_cost(model, tokens)
        cost = InferenceCost(moved, fp32, int8, seconds, cores=torch.get_num_threads())
        return estimate_energy(cost, note=str(exc).split(";")[0])


__all__ = [
    "EnergyReading",
    "EnergyUnavailable",
    "InferenceCost",
    "RaplMeter",
    "RaplZone",
    "counter_delta",
    "energy_per_inference",
    "estimate_energy",
    "find_rapl_zones",
    "linear_cost",
]
