"""Facts about the machine a measurement ran on: CPU model, and how busy other processes kept it.

A latency is only comparable when nothing else ran beside it. The sweep times each trial alone on a
node (a Ray task holding all of that node's CPUs), but processes outside Ray can still be busy; the
`Contention` probe measures the CPU time everybody else used during the timing, so a result can be
flagged as measured under contention instead of being passed off as clean.

Example:
    >>> with Contention() as probe:
    ...     _ = sum(range(1000))
    >>> probe.others_cores >= 0.0 and isinstance(probe.contended, bool)
    True
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import psutil

# Other processes using more than this many cores on average (out of the node's) flag a timing.
CONTENTION_CORES = 0.2


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo with its family and model numbers (or the platform's word for it).

    Example:
        >>> isinstance(cpu_name(), str) and len(cpu_name()) > 0
        True
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:  # a VM's name can be as vague as "AMD EPYC"
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one).

    Example:
        >>> usable_cpus() >= 1
        True
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _busy_seconds() -> float:
    """CPU seconds all processes spent busy since boot (guest time is already inside user time)."""
    times = psutil.cpu_times()
    uncounted = ("idle", "iowait", "guest", "guest_nice")
    return sum(getattr(times, name) for name in times._fields if name not in uncounted)


class Contention:
    """Context manager: CPU seconds other processes burnt while the block ran, as average cores."""

    def __init__(self, threshold: float = CONTENTION_CORES):
        self.threshold = threshold
        self.others_cores: float | None = None

    def __enter__(self) -> "Contention":
        self._process = psutil.Process()
        self._start = (time.perf_counter(), _busy_seconds(), sum(self._process.cpu_times()[:2]))
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, busy0, own0 = self._start
        wall = max(time.perf_counter() - wall0, 1e-9)
        others = (_busy_seconds() - busy0) - (sum(self._process.cpu_times()[:2]) - own0)
        self.others_cores = max(others, 0.0) / wall

    @property
    def contended(self) -> bool:
        """Whether other processes kept more than `threshold` cores busy on average (or it was not measured)."""
        return self.others_cores is None or self.others_cores > self.threshold
