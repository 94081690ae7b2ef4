"""The bundled real model end to end: compress -> save -> load -> forward, size and fidelity measured."""

from __future__ import annotations

import copy

import pytest
import torch

import sparsepress as sp
from sparsepress.evaluate import fidelity
from sparsepress.sources import load_source, read_text, token_samples


@pytest.fixture(scope="module")
def minilm(minilm_path):
    return load_source(minilm_path)


def test_magnitude_int8_minilm_is_small_and_loads(minilm, tmp_path):
    recipe = sp.Recipe.from_yaml("recipes/magnitude-50-int8.yaml")
    ids = token_samples(minilm.tokenizer, read_text(None), 8, 64)
    model = sp.compress(copy.deepcopy(minilm.model), recipe, calibration=ids, tokenizer=minilm.tokenizer)
    out = sp.save(model, tmp_path / "m", source=minilm.path)
    tensors = (out / "sparsepress.safetensors").stat().st_size
    dense = (minilm.path / "model.safetensors").stat().st_size
    assert tensors <= 0.25 * dense
    assert (out / "modules.json").is_file() and (out / "1_Pooling").is_dir()
    loaded = sp.load(out)
    assert type(loaded).__name__ == "BertModel"
    # every FFN GELU runs inside its linear's kernel (the int8 roundings it flips downstream do not
    # stop it), after compress and after load
    for m in (model, loaded):
        fused = [n for n, mod in m.named_modules() if getattr(mod, "activation", None) == "gelu"]
        assert len(fused) == 6 and all(n.endswith("intermediate.dense") for n in fused)
    batch = minilm.tokenizer(["a sentence to embed", "another one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        after = loaded(**batch).last_hidden_state
    assert torch.allclose(before, after, atol=1e-4)


@pytest.mark.slow
def test_sparsegpt_gptq_minilm_beats_magnitude_in_fidelity(minilm):
    ids = token_samples(minilm.tokenizer, read_text(None), 64, 128)
    held = token_samples(minilm.tokenizer, read_text(None, "heldout"), 32, 128, seed=1234)
    scores = {}
    for name in ("magnitude-50-int8", "sparsegpt-50-int8"):
        model = sp.compress(copy.deepcopy(minilm.model), sp.Recipe.from_yaml(f"recipes/{name}.yaml"),
                            calibration=ids, tokenizer=minilm.tokenizer)
        scores[name] = fidelity(model, minilm.model, held)
    assert scores["sparsegpt-50-int8"] > scores["magnitude-50-int8"] + 0.1
    assert scores["sparsegpt-50-int8"] > 0.85
