"""A loaded model is safe to call from several threads at once: 4 threads x 20 forwards, each result
equal to the single-threaded one, on the reference path and (where it loads) the native kernels."""

from __future__ import annotations

import importlib
import threading

import pytest
import torch

import sparsepress as sp
from sparsepress import native
from tiny import tiny_bert, token_ids

THREADS, CALLS = 4, 20


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    model = tiny_bert()
    ids = token_ids()
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                         {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}
    model = sp.compress(model, recipe, calibration=ids)
    # Different formats in one model, so every kernel family runs concurrently.
    for layer, fmt in ((model.encoder.layer[0].intermediate.dense, "csr"), (model.encoder.layer[1].output.dense, "dense")):
        packed = sp.SparseLinear.from_linear(torch.nn.Linear(layer.in_features, layer.out_features), format=fmt, dtype="int8")
        layer.packed = packed.packed
    return sp.save(model, tmp_path_factory.mktemp("conc") / "m")


def _native_module():
    try:
        return importlib.import_module("sparsepress._native")
    except ImportError:
        return None


@pytest.mark.parametrize("mode", ["reference", "native"])
def test_threads_get_the_single_threaded_result(folder, mode, monkeypatch):
    if mode == "native":
        module = _native_module()
        if module is None:
            pytest.skip("the native extension sparsepress._native does not import here")
        monkeypatch.setattr(native, "_MODULE", module)
    else:
        monkeypatch.setattr(native, "_MODULE", None)
    assert native.native_available() == (mode == "native")
    model = sp.load(folder)
    inputs = [torch.randint(0, 100, (2, 8 + i), generator=torch.Generator().manual_seed(i)) for i in range(THREADS)]
    with torch.inference_mode():
        expected = [model(input_ids=ids).last_hidden_state for ids in inputs]
    failures: list[str] = []
    barrier = threading.Barrier(THREADS)

    def work(index: int) -> None:
        try:
            barrier.wait()
            with torch.inference_mode():
                for call in range(CALLS):
                    which = (index + call) % THREADS  # every thread runs every input shape
                    got = model(input_ids=inputs[which]).last_hidden_state
                    if not torch.equal(got, expected[which]):
                        failures.append(f"thread {index} call {call}: max diff {(got - expected[which]).abs().max()}")
        except Exception as exc:  # noqa: BLE001 - reported below, with the thread named
            failures.append(f"thread {index}: {exc!r}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert failures == []
