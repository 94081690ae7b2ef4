"""The tiny LLaMA fixture (trained on WikiText-2 by scripts/train_tiny_llama.py): perplexity under compression."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import sparsepress as sp
from sparsepress.evaluate import perplexity
from sparsepress.sources import bundled_text, load_source, token_samples

FIXTURE = Path(__file__).parent / "fixtures" / "tiny-llama"
# Dense perplexity on the 32 held-out windows below, measured when the fixture was made (README.md).
DENSE_PPL = 151.5


@pytest.fixture(scope="module")
def tiny_llama():
    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip("tests/fixtures/tiny-llama is missing (scripts/train_tiny_llama.py makes it)")
    source = load_source(FIXTURE)
    heldout = token_samples(source.tokenizer, bundled_text("heldout"), 32, 128, seed=1)
    return source.model, source.tokenizer, heldout


def _ppl(model, tokenizer, samples) -> float:
    return perplexity(model, samples, pad_id=tokenizer.pad_token_id)


def _compress(model, stages, tokenizer):
    return sp.compress(copy.deepcopy(model), {"stages": stages}, tokenizer=tokenizer, samples=32, seq_len=128)


def test_fixture_loads_as_float32_llama_with_its_tokenizer():
    from transformers import AutoTokenizer, LlamaForCausalLM

    if not (FIXTURE / "model.safetensors").is_file():
        pytest.skip("tests/fixtures/tiny-llama is missing")
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    model = LlamaForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = tokenizer("The game was released in Japan .", return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == "The game was released in Japan ."
    samples = token_samples(tokenizer, bundled_text("heldout"), 4, 128, seed=1)
    # A trained model, not a random one: uniform guessing over 4096 tokens would give 4096.
    assert perplexity(model, samples, pad_id=tokenizer.pad_token_id) < 2.0 * DENSE_PPL


@pytest.mark.slow
def test_dense_perplexity_matches_the_readme(tiny_llama):
    model, tokenizer, heldout = tiny_llama
    assert _ppl(model, tokenizer, heldout) == pytest.approx(DENSE_PPL, rel=0.01)


@pytest.mark.slow
def test_sparsegpt_half_int8_stays_near_dense_and_survives_save_load(tiny_llama, tmp_path):
    model, tokenizer, heldout = tiny_llama
    dense = _ppl(model, tokenizer, heldout)
    compressed = _compress(model, [{"prune": {"method": "sparsegpt", "sparsity": 0.5}},
                                   {"quantize": {"method": "gptq", "bits": 8}}], tokenizer)
    ppl = _ppl(compressed, tokenizer, heldout)
    # measured 0.999x: the solver (refit toward the dense outputs) can land a hair under this small
    # model's own perplexity; magnitude pruning reads ~1.04x in the quality benchmark
    assert 0.95 * dense < ppl < 1.1 * dense
    sp.save(compressed, tmp_path / "m", tokenizer=tokenizer)
    assert _ppl(sp.load(tmp_path / "m"), tokenizer, heldout) == pytest.approx(ppl, rel=1e-4)


@pytest.mark.slow
def test_magnitude_is_worse_than_sparsegpt_at_half_and_at_seventy(tiny_llama):
    model, tokenizer, heldout = tiny_llama
    ppl = {
        (method, sparsity): _ppl(_compress(model, [{"prune": {"method": method, "sparsity": sparsity}}], tokenizer),
                                 tokenizer, heldout)
        for method in ("magnitude", "sparsegpt") for sparsity in (0.5, 0.7)
    }
    assert ppl["magnitude", 0.5] > ppl["sparsegpt", 0.5]
    assert ppl["magnitude", 0.7] > 1.08 * ppl["sparsegpt", 0.7]  # measured 195.5 vs 170.8


def test_int8_head_keeps_perplexity_within_one_percent_of_the_float_head(tiny_llama):
    model, tokenizer, heldout = tiny_llama
    stages = [{"quantize": {"method": "rtn", "bits": 8}}]
    float_head = _compress(model, stages, tokenizer)
    int8_head = _compress(model, [*stages, {"quantize_embeddings": {"bits": 8, "head": True}}], tokenizer)
    assert isinstance(int8_head.lm_head, sp.SparseLinear) and int8_head.lm_head.packed.dtype == "int8"
    assert not isinstance(float_head.lm_head, sp.SparseLinear)
    reference, ours = _ppl(float_head, tokenizer, heldout[:8]), _ppl(int8_head, tokenizer, heldout[:8])
    assert abs(ours - reference) <= 0.01 * reference
