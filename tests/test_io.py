"""save / load: round trips, byte-identical re-saves, atomic writes, damaged folders refused."""

from __future__ import annotations

import json

import pytest
import torch

import sparsepress as sp
from sparsepress.io import MANIFEST, TENSORS
from tiny import tiny_bert




@pytest.fixture(scope="module")
def compressed():
    model = tiny_bert()
    ids = [torch.randint(0, 100, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}},
                         {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}
    return sp.compress(model, recipe, calibration=ids)


def _ids():
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(7))


def test_save_load_runs_and_matches(compressed, tmp_path):
    sp.save(compressed, tmp_path / "a")
    loaded = sp.load(tmp_path / "a")
    assert type(loaded).__name__ == "BertModel" and not loaded.training
    assert isinstance(loaded.encoder.layer[0].attention.self.query, sp.SparseLinear)
    assert isinstance(loaded.embeddings.word_embeddings, sp.QuantizedEmbedding)
    ids = _ids()
    with torch.no_grad():
        expected = compressed(input_ids=ids).last_hidden_state
        got = loaded(input_ids=ids).last_hidden_state
    assert torch.allclose(expected, got, atol=1e-5)


def test_save_load_save_is_byte_identical(compressed, tmp_path):
    sp.save(compressed, tmp_path / "a")
    sp.save(sp.load(tmp_path / "a"), tmp_path / "b")
    for name in (TENSORS, MANIFEST, "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_manifest_records_layers_and_checksum(compressed, tmp_path):
    sp.save(compressed, tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    assert manifest["format_version"] == 1 and manifest["model_class"] == "BertModel"
    layer = manifest["layers"]["encoder.layer.0.attention.self.query"]
    assert layer["dtype"] == "int8" and layer["method"] == "magnitude" and abs(layer["sparsity"] - 0.5) < 0.05
    assert manifest["recipe"]["stages"][0]["prune"]["method"] == "magnitude"


def test_refuses_non_empty_out_and_keeps_it(compressed, tmp_path):
    out = tmp_path / "a"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(sp.InputError, match="not empty"):
        sp.save(compressed, out)
    assert (out / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp folder left behind


def test_overwrite_replaces_atomically(compressed, tmp_path):
    out = tmp_path / "a"
    sp.save(compressed, out)
    sp.save(compressed, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    sp.load(out)


def test_failed_save_leaves_old_folder(compressed, tmp_path, monkeypatch):
    out = tmp_path / "a"
    sp.save(compressed, out)
    before = (out / TENSORS).read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("sparsepress.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sp.save(compressed, out, overwrite=True)
    assert (out / TENSORS).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_flipped_byte_is_a_checksum_error(compressed, tmp_path):
    out = sp.save(compressed, tmp_path / "a")
    data = bytearray((out / TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / TENSORS).write_bytes(bytes(data))
    with pytest.raises(sp.ChecksumError, match=TENSORS):
        sp.load(out)


def test_newer_format_version_is_refused(compressed, tmp_path):
    out = sp.save(compressed, tmp_path / "a")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(sp.VersionError, match="newer"):
        sp.load(out)


def test_missing_tensor_is_a_layout_error(compressed, tmp_path):
    from safetensors.torch import load_file, save_file

    from sparsepress.io import sha256_of

    out = sp.save(compressed, tmp_path / "a")
    tensors = load_file(str(out / TENSORS))
    tensors.pop("encoder.layer.0.attention.self.query.mask")
    save_file(tensors, str(out / TENSORS))
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["tensors_sha256"] = sha256_of(out / TENSORS)
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(sp.TensorLayoutError, match="query"):
        sp.load(out)


def test_dense_model_saves_and_loads(tmp_path):
    model = tiny_bert()
    sp.save(model, tmp_path / "d")
    loaded = sp.load(tmp_path / "d")
    ids = _ids()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state, atol=1e-6)
