"""A thread harness for run-time switching tests: callers run while another thread switches levels.

Example:
    mixed = calls_while_switching(lambda: model(**batch).last_hidden_state, expected,
                                  switch=lambda: [sp.set_sparsity(model, v) for v in LEVELS])
    assert mixed == 0
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch


def calls_while_switching(call: Callable[[], torch.Tensor], expected: Sequence[torch.Tensor],
                          switch: Callable[[], object], callers: int = 3, calls: int = 10,
                          atol: float = 1e-6) -> int:
    """Runs `calls` calls on each of `callers` threads while one more thread runs `switch` over and over;
    returns how many outputs matched none of `expected` (a call that saw a mix of levels). An exception
    in any thread is raised here."""
    stop = threading.Event()
    mixed: list[int] = []
    errors: list[BaseException] = []

    def caller() -> None:
        try:
            for _ in range(calls):
                with torch.inference_mode():
                    out = call()
                if not any(torch.allclose(out, e, atol=atol) for e in expected):
                    mixed.append(1)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread below
            errors.append(exc)

    def switcher() -> None:
        try:
            while not stop.is_set():
                switch()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    flipper = threading.Thread(target=switcher)
    flipper.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    flipper.join()
    if errors:
        raise errors[0]
    return len(mixed)
