"""Where trials run: Ray tasks with declared CPU and memory needs, or one at a time in this process.

Both runners have the same small surface the driver uses: `put` a value once (Ray's object store),
`share_module` (ship a user's module to workers), `submit` a function with its resource needs, `wait` for some to finish, `result` of one (raising what
the task raised, as `TaskFailed`), `exclusive_cpus` (how many CPUs a timing task takes to have its
node to itself) and `close`.

Example:
    >>> runner = InlineRunner()
    >>> handle = runner.submit(pow, 2, 10, cpus=1, memory=0)
    >>> [runner.result(h) for h in runner.wait([handle], timeout=0)]
    [1024]
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import InputError
from .machine import usable_cpus


class TaskFailed(Exception):
    """A trial's task raised (or its worker died); the message names the original error."""


@dataclass(eq=False)
class _InlineHandle:
    function: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: bool = False
    value: Any = None
    error: BaseException | None = None


@dataclass
class InlineRunner:
    """Runs each submitted task in this process when `wait` asks for it, one at a time (no Ray)."""

    cpus: int = field(default_factory=usable_cpus)

    @property
    def slots(self) -> int:
        return 1

    def exclusive_cpus(self) -> int:
        return self.cpus

    def put(self, value: Any) -> Any:
        return value

    def share_module(self, name: str) -> None:
        pass

    def submit(
        self,
        function: Callable[..., Any],
        *args: Any,
        cpus: float,
        memory: int,
        exclusive: bool = False,
        **kwargs: Any,
    ) -> _InlineHandle:
        return _InlineHandle(function, args, kwargs)

    def wait(self, handles: list[_InlineHandle], timeout: float) -> list[_InlineHandle]:
        finished = [h for h in handles if h.done]
        if finished or not handles:
            return finished
        handle = handles[0]
        try:
            handle.value = handle.function(*handle.args, **handle.kwargs)
        except Exception as exc:  # recorded against the trial, exactly as a Ray task's error is
            handle.error = exc
        handle.done = True
        return [handle]

    def result(self, handle: _InlineHandle) -> Any:
        if handle.error is not None:
            raise TaskFailed(_describe(handle.error)) from handle.error
        return handle.value

    def close(self) -> None:
        pass


class RayRunner:
    """Trials as Ray tasks: a local Ray on this machine's CPUs, or an existing cluster at `address`.

    Timing tasks (`exclusive=True`) are pinned to one node and ask for all of its CPUs, so Ray runs
    nothing else there while they time, and every latency of a sweep comes from the same node.
    """

    def __init__(
        self, address: str | None = None, *, cpus: int | None = None, object_store_bytes: int | None = None
    ):
        try:
            import ray
        except ImportError:
            raise InputError(
                "--address",
                "sweeps run trials on Ray: pip install 'sparsepress[dist]' "
                "(or pass --address inline to run them one at a time here)",
            ) from None
        self._ray = ray
        options: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": True,
        }
        try:
            if address:
                ray.init(address=address, **options)
            else:  # "local": a fresh instance, never a cluster some earlier `ray start` left behind
                ray.init(address="local", num_cpus=cpus or usable_cpus(), object_store_memory=object_store_bytes, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            hint = " (a cluster with token authentication needs RAY_AUTH_MODE=token and its token)" if address else ""
            raise InputError(address or "local Ray", f"cannot start or reach Ray: {exc}{hint}") from None
        self._remote: dict[Callable[..., Any], Any] = {}
        self._node = self._timing_node()

    def _timing_node(self) -> tuple[str, int]:
        nodes = [n for n in self._ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) >= 1]
        if not nodes:
            raise InputError("Ray cluster", "no live node with a CPU")
        node = max(nodes, key=lambda n: (n["Resources"]["CPU"], n["NodeID"]))
        return node["NodeID"], int(node["Resources"]["CPU"])

    @property
    def slots(self) -> int:
        """How many one-CPU tasks the cluster runs at once."""
        return max(1, int(self._ray.cluster_resources().get("CPU", 1)))

    def exclusive_cpus(self) -> int:
        return self._node[1]

    def put(self, value: Any) -> Any:
        return self._ray.put(value)

    def share_module(self, name: str) -> None:
        """Ship module `name` (a user's metric) to workers by value: they need not be able to import it."""
        import sys

        from ray import cloudpickle

        if name != "sparsepress" and not name.startswith("sparsepress."):
            cloudpickle.register_pickle_by_value(sys.modules[name])

    def submit(
        self,
        function: Callable[..., Any],
        *args: Any,
        cpus: float,
        memory: int,
        exclusive: bool = False,
        **kwargs: Any,
    ) -> Any:
        remote = self._remote.get(function)
        if remote is None:
            remote = self._remote[function] = self._ray.remote(function)
        options: dict[str, Any] = {"num_cpus": cpus, "memory": memory or None, "max_retries": 1}
        if exclusive:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options.update(
                num_cpus=self._node[1],
                scheduling_strategy=NodeAffinitySchedulingStrategy(self._node[0], soft=False),
            )
        return remote.options(**options).remote(*args, **kwargs)

    def wait(self, handles: list[Any], timeout: float) -> list[Any]:
        if not handles:
            return []
        ready, _ = self._ray.wait(handles, num_returns=len(handles), timeout=timeout)
        return ready

    def result(self, handle: Any) -> Any:
        from ray.exceptions import RayError, RayTaskError

        try:
            return self._ray.get(handle)
        except RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            raise TaskFailed(_describe(cause)) from None
        except (
            RayError
        ) as exc:  # the worker died (out of memory, killed): the trial failed, the sweep goes on
            raise TaskFailed(
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from None

    def close(self) -> None:
        self._ray.shutdown()


def _describe(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def make_runner(address: str | None, *, object_store_bytes: int | None = None) -> InlineRunner | RayRunner:
    """`inline` runs in this process; None starts a local Ray; anything else is a Ray cluster address.

    Example:
        >>> type(make_runner("inline")).__name__
        'InlineRunner'
    """
    if address == "inline":
        return InlineRunner()
    return RayRunner(address, object_store_bytes=object_store_bytes)
