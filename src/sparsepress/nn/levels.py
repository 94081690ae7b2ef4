"""Runtime levels of a loaded model (activation sparsity, elastic sparsity, ...) that every call sees whole.

A model's `RuntimeLevels` holds the current value of each runtime knob. Switching is a single
assignment; a forward pre-hook on the model's root takes a snapshot of the values for the calling
thread when a call starts and drops it when the call ends, and the layers read that snapshot. So a call
in flight keeps the level it started with while another thread switches: it never sees a mix.
A knob that acts on the calling thread rather than on layers (the thread count, `nn/threads.py`)
registers a per-call handler with `on_call`: it runs with the snapshot's value when the call starts, and
what it returns undoes it when the call ends.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Identity())
    >>> levels = RuntimeLevels.of(model)
    >>> levels.offer("activation", [0.0, 0.4])
    >>> levels.set("activation", 0.4)
    >>> levels.get("activation"), RuntimeLevels.of(model) is levels
    (0.4, True)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from torch import nn

_ATTR = "_sparsepress_levels"


class RuntimeLevels:
    """Current runtime knob values of one model, with per-call snapshots (see the module docstring)."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._offered: dict[str, tuple[float, ...]] = {}
        self._handlers: dict[str, Callable[[float], Callable[[], None]]] = {}
        self._local = threading.local()

    @classmethod
    def of(cls, model: nn.Module) -> RuntimeLevels:
        """The model's levels, created (and its root hooked) on first use."""
        levels = model.__dict__.get(_ATTR)
        if levels is None:
            levels = cls()
            object.__setattr__(model, _ATTR, levels)  # a plain attribute: not a submodule, not saved
            model.register_forward_pre_hook(levels._enter)
            model.register_forward_hook(levels._leave, always_call=True)  # also when a call raises
        return levels

    def __deepcopy__(self, memo: dict[int, Any]) -> RuntimeLevels:
        # a copied model follows its own levels (its copied hooks are bound to this copy)
        copy = RuntimeLevels()
        copy._values, copy._offered = dict(self._values), dict(self._offered)
        copy._handlers = dict(self._handlers)
        memo[id(self)] = copy
        return copy

    def offer(self, knob: str, levels: list[float]) -> None:
        """Declare the levels `knob` can take on this model (what `set` accepts)."""
        self._offered[knob] = tuple(sorted(float(v) for v in levels))

    def offered(self, knob: str) -> list[float]:
        """The levels `knob` can take on this model (empty: the model has no such knob)."""
        return list(self._offered.get(knob, ()))

    def set(self, knob: str, value: float) -> None:
        """Switch `knob` for calls that start from now on; ValueError naming the offered levels otherwise."""
        offered = self._offered.get(knob, ())
        if not any(abs(float(value) - level) < 1e-9 for level in offered):
            stored = ", ".join(f"{level:g}" for level in offered) or "none"
            raise ValueError(f"{knob} level {value!r} is not stored in this model; stored levels: {stored}")
        self._values = {**self._values, knob: float(value)}  # one assignment: readers see old or new

    def on_call(self, knob: str, enter: Callable[[float], Callable[[], None]]) -> None:
        """Run `enter(value)` on the calling thread when a call starts with `knob` set; the callable it
        returns runs when that call ends (also when it raises).

        Example:
            >>> import torch
            >>> model, seen = torch.nn.Identity(), []
            >>> levels = RuntimeLevels.of(model)
            >>> levels.offer("demo", [1.0]); levels.set("demo", 1.0)
            >>> levels.on_call("demo", lambda v: (seen.append(("in", v)), lambda: seen.append("out"))[1])
            >>> _ = model(torch.ones(1)); seen
            [('in', 1.0), 'out']
        """
        self._handlers = {**self._handlers, knob: enter}

    def get(self, knob: str, default: float = 0.0) -> float:
        """The value this thread's call started with (the current one outside a call)."""
        values = getattr(self._local, "values", None)
        return (values if values is not None else self._values).get(knob, default)

    def _enter(self, _module: nn.Module, _args: Any) -> None:
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            values = self._values
            self._local.values = values
            self._local.undo = [enter(values[knob]) for knob, enter in self._handlers.items() if knob in values]
        self._local.depth = depth + 1

    def _leave(self, _module: nn.Module, _args: Any, _output: Any) -> None:
        self._local.depth -= 1
        if self._local.depth == 0:
            self._local.values = None
            for undo in reversed(self._local.undo):
                undo()
            self._local.undo = []


def runtime_levels(module: nn.Module) -> RuntimeLevels | None:
    """The levels a layer follows (set by `attach`), or None.

    Example:
        >>> runtime_levels(nn.Linear(2, 2)) is None
        True
    """
    return module.__dict__.get(_ATTR)


def attach(model: nn.Module, layer: nn.Module) -> RuntimeLevels:
    """Make `layer` follow `model`'s levels; returns them.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> attach(model, model[0]) is runtime_levels(model[0])
        True
    """
    levels = RuntimeLevels.of(model)
    if layer is not model:
        object.__setattr__(layer, _ATTR, levels)
    return levels
