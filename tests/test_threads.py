"""Per-call thread counts (sparsepress.nn.threads): the same outputs at every count, a count per calling
thread, and one count for a whole call while another thread switches it."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import tiny_bert, token_ids

import sparsepress as sp
from sparsepress.nn.threads import limit_threads, num_threads, per_call_threads_available, thread_levels
from sparsepress.runtime import native_blocks_of

pytestmark = pytest.mark.skipif(not per_call_threads_available(), reason="torch runs on no OpenMP runtime here")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": [0.5, 0.9]}},
                         {"quantize": {"method": "gptq", "bits": 8}}], "solver": {"mask_search": 0}}
    return sp.compress(tiny_bert(), recipe, calibration=token_ids(8, 16))


@pytest.mark.parametrize("native_path", [True, False])
@pytest.mark.parametrize("batch,seq", [(1, 3), (1, 40), (3, 17)])
def test_every_thread_count_gives_the_default_outputs_bit_for_bit(model, native_path, batch, seq):
    ids = torch.randint(3, 100, (batch, seq), generator=torch.Generator().manual_seed(seq))
    forward = native_blocks_of(model)
    if forward is not None:
        forward.enabled = native_path
    try:
        for level in (0.5, 0.9):
            sp.set_sparsity(model, level)
            sp.set_num_threads(model, 0)
            with torch.inference_mode():
                expected = model(input_ids=ids).last_hidden_state
            for count in (1, 2, 3):
                sp.set_num_threads(model, count)
                with torch.inference_mode():
                    assert torch.equal(model(input_ids=ids).last_hidden_state, expected), (level, count)
    finally:
        sp.set_num_threads(model, 0)
        if forward is not None:
            forward.enabled = True


class Probe(torch.nn.Module):
    """Records the thread count each pass through it sees; the middle one may run `during` once."""

    def __init__(self, seen: list[int]):
        super().__init__()
        self.seen, self.during = seen, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.get_num_threads())
        if self.during is not None:
            self.during()
        return x


def test_a_call_keeps_the_count_it_started_with():
    seen: list[int] = []
    probes = [Probe(seen) for _ in range(3)]
    layer = sp.SparseLinear.from_linear(torch.nn.Linear(8, 8), format="dense", dtype="int8")
    model = torch.nn.Sequential(probes[0], layer, probes[1], layer, probes[2])
    sp.set_num_threads(model, 1)

    def switch_elsewhere() -> None:  # another thread switches the model to 3 threads in the middle of this call
        switcher = threading.Thread(target=sp.set_num_threads, args=(model, 3))
        switcher.start()
        switcher.join()

    probes[1].during = switch_elsewhere
    model(torch.ones(2, 8))
    assert seen == [1, 1, 1] and num_threads(model) == 3
    probes[1].during = None
    seen.clear()
    model(torch.ones(2, 8))
    assert seen == [3, 3, 3]
    sp.set_num_threads(model, 0)
    seen.clear()
    model(torch.ones(2, 8))
    assert seen == [torch.get_num_threads()] * 3


def test_counts_belong_to_the_calling_thread():
    default = torch.get_num_threads()
    inside = threading.Event()
    seen: dict[str, int] = {}

    def limited() -> None:
        with limit_threads(default + 1):
            seen["limited"] = torch.get_num_threads()
            inside.set()
            leave.wait()
        seen["after"] = torch.get_num_threads()

    leave = threading.Event()
    worker = threading.Thread(target=limited)
    worker.start()
    inside.wait()
    seen["other"] = torch.get_num_threads()  # while the worker runs at another count
    leave.set()
    worker.join()
    assert seen == {"limited": default + 1, "other": default, "after": default}


def test_the_count_is_restored_when_a_call_raises():
    default = torch.get_num_threads()
    model = torch.nn.Linear(2, 2)
    sp.set_num_threads(model, default + 1)
    with pytest.raises(RuntimeError):
        model(torch.ones(1, 3))
    assert torch.get_num_threads() == default
    with pytest.raises(ValueError, match=">= 0"):
        sp.set_num_threads(model, -1)


def test_the_controller_sees_one_thread_and_all_threads():
    levels = thread_levels(torch.nn.Linear(2, 2))
    assert levels == ([1.0, float(torch.get_num_threads())] if torch.get_num_threads() > 1 else [])
