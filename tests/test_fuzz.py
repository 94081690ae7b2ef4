"""Byte-level fuzzing of a saved folder: every damaged file gives a clean FormatError / InputError (or,
for a harmless change, a model that loads), never a crash, a MemoryError or another exception type.

The tensors file and config are re-sealed (their sha256 rewritten in the manifest) in half the
examples, so the safetensors, config and layout parsers are exercised, not only the checksum.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparsepress as sp
from sparsepress.formats import CSRWeight
from sparsepress.io import MANIFEST, TENSORS, sha256_of, verify_folder

FILES = [TENSORS, MANIFEST, "config.json"]
CLEAN = (sp.FormatError, sp.InputError)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=32)).eval()
    ids = [torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    recipe = {"stages": [{"prune": {"method": "magnitude", "pattern": "2:4"}}, {"quantize": {"method": "rtn", "bits": 4}},
                         {"quantize_embeddings": {"bits": 4}}], "format": "nm"}
    model = sp.compress(model, recipe, calibration=ids)
    dense = model.encoder.layer[0].output.dense  # one csr layer too, for its index parser
    csr = CSRWeight.pack(dense.weight, dtype="int4", scales=dense.packed.scales, group_size=dense.packed.group_size)
    model.encoder.layer[0].output.dense = sp.SparseLinear(csr, dense.bias)
    return sp.save(model, tmp_path_factory.mktemp("fuzz") / "m")


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]), st.floats(0, 1), st.integers(0, 255))


def _mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        at = min(int(where * len(buf)), max(len(buf) - 1, 0))
        if op == "flip" and buf:
            buf[at] ^= 1 << (value % 8)
        elif op == "set" and buf:
            buf[at] = value
        elif op == "insert":
            buf[at:at] = bytes([value]) * (1 + value % 4)
        elif op == "delete" and buf:
            del buf[at : at + 1 + value % 8]
        elif op == "truncate":
            del buf[at:]
    return bytes(buf)


def _reseal(folder: Path) -> None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if isinstance(manifest, dict):
        manifest["tensors_sha256"] = sha256_of(folder / TENSORS)
        manifest["config_sha256"] = sha256_of(folder / "config.json")
        (folder / MANIFEST).write_text(json.dumps(manifest))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(FILES), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_folder_never_crashes(saved, tmp_path_factory, target, ops, reseal):
    folder = tmp_path_factory.mktemp("case") / "m"
    shutil.copytree(saved, folder)
    path = folder / target
    path.write_bytes(_mutate(path.read_bytes(), ops))
    if reseal and target != MANIFEST:
        _reseal(folder)
    for check in (verify_folder, sp.load):
        try:
            check(folder)
        except CLEAN:
            pass  # a clean, named refusal
    shutil.rmtree(folder.parent)
