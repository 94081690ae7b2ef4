"""--resume: an interrupted compression continues from per-block checkpoints, byte-identical to an
uninterrupted run; a checkpoint of another run is refused; one without --resume is replaced."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import sparsepress as sp
from sparsepress.passes.block_checkpoint import BlockCheckpoint
from sparsepress.passes.layer_solve import BlockSolver
from sparsepress.checkpoint import Checkpoint, checkpoint_folder, weights_digest
from sparsepress.cli import app
from sparsepress.io import TENSORS
from tiny import tiny_bert, token_ids

runner = CliRunner()
RECIPE = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq"}},
                     {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}


class Stop(Exception):
    pass






def _stop_after_block(n):
    def progress(what, done, total):
        if what == "compressing blocks" and done == n:
            raise Stop
    return progress


def test_resumed_run_is_byte_identical(tmp_path, monkeypatch):
    reference = sp.save(sp.compress(tiny_bert(), RECIPE, calibration=token_ids(), batch_size=4), tmp_path / "ref")
    out = tmp_path / "out"
    model = tiny_bert()
    ckpt = Checkpoint.for_output(out, model)
    with pytest.raises(Stop):
        sp.compress(model, RECIPE, calibration=token_ids(), batch_size=4, checkpoint=ckpt, progress=_stop_after_block(1))
    folder = checkpoint_folder(out)
    assert sorted(p.name for p in folder.iterdir()) == [
        "block-0000.json", "block-0000.safetensors", "fingerprint.json", "hidden-0000.safetensors"]
    calls = []
    original = BlockSolver.compress_block
    monkeypatch.setattr(BlockSolver, "compress_block",
                        lambda self, name, *a: calls.append(name) or original(self, name, *a))
    model = tiny_bert()
    resumed = sp.compress(model, RECIPE, calibration=token_ids(), batch_size=4,
                          checkpoint=Checkpoint.for_output(out, model, resume=True))
    assert calls == ["encoder.layer.1"]  # block 0 came from the checkpoint
    sp.save(resumed, out)
    assert (out / TENSORS).read_bytes() == (reference / TENSORS).read_bytes()
    assert json.loads((out / "sparsepress.json").read_text())["layers"] == \
        json.loads((reference / "sparsepress.json").read_text())["layers"]


def test_mismatching_fingerprint_is_refused(tmp_path):
    out = tmp_path / "out"
    model = tiny_bert()
    with pytest.raises(Stop):
        sp.compress(model, RECIPE, calibration=token_ids(), checkpoint=Checkpoint.for_output(out, model),
                    progress=_stop_after_block(1))
    other = {**RECIPE, "seed": 1}
    model = tiny_bert()
    with pytest.raises(sp.InputError, match=r"another run \(different recipe, seed\).*without --resume"):
        sp.compress(model, other, calibration=token_ids(), checkpoint=Checkpoint.for_output(out, model, resume=True))
    with torch.no_grad():
        model.encoder.layer[0].output.dense.weight.mul_(2)
    with pytest.raises(sp.InputError, match=r"different weights_sha256"):
        sp.compress(model, RECIPE, calibration=token_ids(), checkpoint=Checkpoint(checkpoint_folder(out),
                    weights=weights_digest(model), resume=True))
    model = tiny_bert()
    with pytest.raises(sp.InputError, match=r"different calibration_sha256"):
        sp.compress(model, RECIPE, calibration=token_ids()[:3], checkpoint=Checkpoint.for_output(out, model, resume=True))


def test_damaged_checkpoint_is_a_format_error(tmp_path):
    out = tmp_path / "out"
    model = tiny_bert()
    with pytest.raises(Stop):
        sp.compress(model, RECIPE, calibration=token_ids(), checkpoint=Checkpoint.for_output(out, model),
                    progress=_stop_after_block(1))
    path = checkpoint_folder(out) / "block-0000.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    model = tiny_bert()
    with pytest.raises(sp.FormatError, match="block-0000.safetensors.*damaged"):
        sp.compress(model, RECIPE, calibration=token_ids(), checkpoint=Checkpoint.for_output(out, model, resume=True))


def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_resume_end_to_end(tiny_bert_dir, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {method: wanda, sparsity: 0.5}\n  - quantize: {method: rtn}\nformat: bitmask\n")
    common = ["--recipe", recipe, "--samples", "4", "--seq-len", "16"]
    assert _cli("compress", tiny_bert_dir, *common, "--out", tmp_path / "ref").exit_code == 0
    assert not checkpoint_folder(tmp_path / "ref").exists()  # deleted on success

    out = tmp_path / "out"
    original = BlockCheckpoint.save_block

    def interrupt_after_first(self, index, *args):
        original(self, index, *args)
        if index == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(BlockCheckpoint, "save_block", interrupt_after_first)
    result = _cli("compress", tiny_bert_dir, *common, "--out", out)
    assert result.exit_code == 130 and "--resume" in result.output and "Traceback" not in result.output
    assert not out.exists() and (checkpoint_folder(out) / "block-0000.json").is_file()
    monkeypatch.setattr(BlockCheckpoint, "save_block", original)

    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("0.5", "0.6"))
    result = _cli("compress", tiny_bert_dir, "--recipe", other, "--samples", "4", "--seq-len", "16", "--out", out, "--resume")
    assert result.exit_code == 1 and "another run" in result.output and "Traceback" not in result.output

    result = _cli("compress", tiny_bert_dir, *common, "--out", out, "--resume")
    assert result.exit_code == 0, result.output
    assert not checkpoint_folder(out).exists()
    assert (out / TENSORS).read_bytes() == (tmp_path / "ref" / TENSORS).read_bytes()


def test_without_resume_an_old_checkpoint_is_replaced(tiny_bert_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    out = tmp_path / "out"
    stale = checkpoint_folder(out)
    stale.mkdir()
    (stale / "fingerprint.json").write_text("{not even json")
    (stale / "block-0000.json").write_text("garbage")
    result = _cli("compress", tiny_bert_dir, "--recipe", recipe, "--samples", "4", "--seq-len", "16", "--out", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists()
    sp.load(out)
