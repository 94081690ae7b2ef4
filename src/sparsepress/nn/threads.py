"""How many threads a call runs on: per call and per calling thread, never process-wide.

Every parallel piece of a forward pass takes its thread count from `torch.get_num_threads()` at the
moment it runs: our kernels, the native Stack and attention pass it on (csrc/threadpool.h, and the host
OpenMP team of csrc/openmp_team.h runs exactly that many), torch's own ops size their OpenMP regions
by it. With torch's OpenMP build that number is the calling OS thread's OpenMP `nthreads-var` (libgomp
and libiomp5 keep it per thread), so setting it for the calling thread only, for the span of one call,
changes the whole call and nothing else: concurrent calls from other threads keep theirs, and a call
never mixes counts. `torch.set_num_threads` instead changes a process-wide default under calls in flight.

`set_num_threads(model, n)` makes every later call of `model` run on `n` threads ("threads" knob of the
model's `RuntimeLevels`: each call takes it from the snapshot it starts with; 0 goes back to torch's
count). `limit_threads(n)` does the same for a block of code. Outputs do not change with the count: each
row's reductions run in one thread whatever the split (tested bit for bit).

Why: on a machine where other processes take the cores, a call split over threads waits at every
barrier for whichever thread was descheduled (MiniLM at batch 1 under one busy process per core: p95 of
~350 ms at 2 threads against ~9 ms at 1 thread, README "The runtime controller"). The runtime
controller sees the count as an operating point ("threads" knob: speed only, no accuracy spent).

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 2)
    >>> if per_call_threads_available():
    ...     set_num_threads(model, 1)
    ...     assert num_threads(model) == 1
    ...     with limit_threads(1):
    ...         assert torch.get_num_threads() == 1
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from functools import cache

import torch
from torch import nn

from .levels import RuntimeLevels

KNOB = "threads"


@cache
def _openmp() -> ctypes.CDLL | None:
    """The OpenMP runtime torch runs on (already loaded: never a second one), or None."""
    from ..native import host_openmp_library

    path = host_openmp_library()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)
        setter, getter = lib.omp_set_num_threads, lib.omp_get_max_threads
    except (OSError, AttributeError):
        return None
    setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
    return lib


def per_call_threads_available() -> bool:
    """Whether the calling thread's count can be set alone (torch runs on an OpenMP runtime we found).

    Example:
        >>> isinstance(per_call_threads_available(), bool)
        True
    """
    return _openmp() is not None


def _enter(count: float) -> Callable[[], None]:
    lib = _openmp()
    n = int(count)
    if lib is None or n <= 0:
        return _nothing
    # torch sets a thread's count on its first use there: let that happen before we override it
    before = torch.get_num_threads()
    if n == before:
        return _nothing
    lib.omp_set_num_threads(n)
    return lambda: lib.omp_set_num_threads(before)


def _nothing() -> None:
    return None


@contextlib.contextmanager
def limit_threads(n: int) -> Iterator[None]:
    """Run the block on `n` threads, on the calling thread only (other threads keep their count).

    RuntimeError when the count cannot be set per thread (`per_call_threads_available()` is False).

    Example:
        >>> if per_call_threads_available():
        ...     with limit_threads(1):
        ...         assert torch.get_num_threads() == 1
    """
    if n < 1:
        raise ValueError(f"a thread count is >= 1, got {n}")
    if _openmp() is None:
        raise RuntimeError("torch does not run on an OpenMP runtime this process can reach: the thread "
                           "count can only be set process-wide (torch.set_num_threads)")
    undo = _enter(n)
    try:
        yield
    finally:
        undo()


def thread_levels(model: nn.Module) -> list[float]:
    """The thread counts the runtime controller may run `model` at: 1 and torch's count (fewest first;
    [] when the count cannot be set per call or torch runs on one thread).

    Example:
        >>> levels = thread_levels(torch.nn.Linear(2, 2))
        >>> levels == [] or levels == [1.0, float(torch.get_num_threads())]
        True
    """
    most = torch.get_num_threads()
    return [1.0, float(most)] if most > 1 and per_call_threads_available() else []


def num_threads(model: nn.Module) -> int:
    """The thread count calls of `model` start with now (0: torch's count, the default).

    Example:
        >>> num_threads(torch.nn.Linear(2, 2))
        0
    """
    return int(RuntimeLevels.of(model).get(KNOB, 0.0))


def set_num_threads(model: nn.Module, n: int) -> None:
    """Run calls of `model` that start from now on `n` threads (0: torch's count); calls in flight keep theirs.

    The count holds for the calling thread during each call (see the module docstring), so calls from
    several threads may run at different counts side by side. RuntimeError when the count cannot be set
    per thread here (`per_call_threads_available()`); ValueError for a negative count.

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> if per_call_threads_available():
        ...     set_num_threads(model, 1)
        ...     set_num_threads(model, 0)  # back to torch's count
        >>> num_threads(model)
        0
    """
    n = int(n)
    if n < 0:
        raise ValueError(f"a thread count is >= 0 (0: torch's count), got {n}")
    if _openmp() is None:
        raise RuntimeError("torch does not run on an OpenMP runtime this process can reach: the thread "
                           "count can only be set process-wide (torch.set_num_threads)")
    levels = RuntimeLevels.of(model)
    levels.offer(KNOB, sorted({0.0, float(n), *levels.offered(KNOB)}))
    levels.on_call(KNOB, _enter)
    levels.set(KNOB, float(n))


def _register_knob() -> None:
    from ..adaptive import Knob, register_knob

    register_knob(Knob(KNOB, levels=thread_levels, apply=lambda m, v: set_num_threads(m, int(v)), threads=True))


_register_knob()
