"""Streamed compression (models larger than memory): the same packed model as in memory, a bounded peak,
clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import sparsepress as sp
from sparsepress.cli import app
from sparsepress.errors import InputError, RecipeError
from sparsepress.sources import load_source
from sparsepress.stream import open_streamed
from tiny import token_ids

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _write(folder: Path, family: str, dtype: torch.dtype = torch.bfloat16, tie: bool = False,
           shard: str | None = None) -> Path:
    """A seeded random model of `family` saved as safetensors (sharded when `shard` is a size)."""
    import transformers

    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=64)
        model = transformers.BertModel(config)
    else:
        config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                 "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
        model = model_cls(config_cls(**SMALL, tie_word_embeddings=tie))
    kwargs = {"max_shard_size": shard} if shard else {}
    model.to(dtype).save_pretrained(folder, **kwargs)
    return folder


def _saved_tensors(model, folder: Path) -> dict[str, torch.Tensor]:
    sp.save(model, folder)
    return load_file(folder / "sparsepress.safetensors")


RECIPES = {
    "wanda+rtn": {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}],
                  "format": "bitmask"},
    # the default solver: sequential groups, dense twin, refit, bias correction, mask search
    "sparsegpt+gptq": {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq"}}],
                       "format": "bitmask", "solver": {"mask_search": 3}},
}


@pytest.mark.parametrize("family,dtype,tie,shard,recipe", [
    ("llama", torch.bfloat16, True, None, "sparsegpt+gptq"),
    ("llama", torch.float16, False, "40KB", "wanda+rtn"),
    ("qwen2", torch.float32, False, None, "sparsegpt+gptq"),  # q/k/v biases
    ("mistral", torch.bfloat16, False, None, "wanda+rtn"),
    ("bert", torch.float32, False, "40KB", "sparsegpt+gptq"),
])
def test_streamed_compression_packs_the_same_tensors_as_in_memory(tmp_path, family, dtype, tie, shard, recipe):
    source = _write(tmp_path / "src", family, dtype, tie, shard)
    ids = token_ids(4, length=16)
    in_memory = sp.compress(load_source(source).model, RECIPES[recipe], calibration=ids)
    streamed_source = load_source(source, stream=True)
    assert streamed_source.weights is not None
    streamed = sp.compress(streamed_source.model, RECIPES[recipe], calibration=ids, weights=streamed_source.weights)
    assert not any(p.is_meta for p in streamed.parameters())
    expected = _saved_tensors(in_memory, tmp_path / "memory")
    got = _saved_tensors(streamed, tmp_path / "stream")
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert streamed.sparsepress_record.layers == in_memory.sparsepress_record.layers
    x = torch.randint(0, 100, (1, 12))
    torch.testing.assert_close(sp.load(tmp_path / "stream")(x)[0], in_memory(x)[0], atol=1e-5, rtol=1e-5)


def test_a_streamed_block_is_loaded_only_for_its_solve(tmp_path):
    """While block 0 is solved, block 1 is still on disk; the dense weights replaced by packed ones are let go."""
    model, weights = open_streamed(_write(tmp_path / "src", "llama"))
    seen = []

    def progress(_what, done, _total):
        seen.append((done, model.model.layers[1].mlp.up_proj.weight.is_meta))

    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}
    dense_up = model.model.layers[0].mlp.up_proj
    sp.compress(model, recipe, calibration=token_ids(2), weights=weights, progress=progress)
    assert seen == [(1, True), (2, False)]
    assert dense_up.weight.is_meta  # the dense layer the solve replaced holds no tensor any more


def test_streaming_refuses_an_unsupported_architecture(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(tmp_path)
    with pytest.raises(InputError, match=r"config\.json.*streaming supports model types .*not 'gpt2'"):
        load_source(tmp_path, stream=True)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["compress", str(tmp_path), "--recipe", str(_recipe_file(tmp_path)),
                                      "--out", str(out), "--stream"])
    assert result.exit_code == 1
    assert "not 'gpt2'" in result.output and "Traceback" not in result.output
    assert not out.exists()


def _recipe_file(folder: Path) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(json.dumps(RECIPES["wanda+rtn"]))
    return path


@pytest.mark.parametrize("recipe,field", [
    ({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5, "allocation": "owl"}}]}, "prune.allocation"),
    ({"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"distill": {"steps": 1}}]}, "stages.distill"),
    ({"stages": [{"prune": {"method": "magnitude", "sparsity": 0.25, "pattern": "channel"}}]}, "stages"),
    ({"stages": [{"quantize_embeddings": {}}]}, "stages"),
    ({"stages": [{"quantize": {}}], "budget": {"size_mb": 1}}, "budget"),
])
def test_streaming_refuses_recipes_that_read_the_whole_dense_model(tmp_path, recipe, field):
    model, weights = open_streamed(_write(tmp_path, "llama"))
    with pytest.raises(RecipeError) as caught:
        sp.compress(model, recipe, calibration=token_ids(2), weights=weights)
    assert caught.value.field == field
    assert all(p.is_meta for p in model.model.layers[0].parameters())  # refused before reading anything


def test_a_skeleton_without_its_reader_is_refused(tmp_path):
    model, _ = open_streamed(_write(tmp_path, "llama"))
    with pytest.raises(InputError, match="meta device; pass the reader"):
        sp.compress(model, RECIPES["wanda+rtn"], calibration=token_ids(2))


def test_a_missing_tensor_is_named(tmp_path):
    from safetensors.torch import save_file

    folder = _write(tmp_path, "llama")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model, weights = open_streamed(folder)
    with pytest.raises(InputError, match="'model.layers.1.mlp.down_proj.weight' is missing"):
        sp.compress(model, RECIPES["wanda+rtn"], calibration=token_ids(2), weights=weights)


# The child measures the RSS it gains while loading, compressing and saving; it starts after a run on a
# tiny model, so only what the model's size costs counts.
_PEAK_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    import sparsepress as sp
    from sparsepress.sources import load_source
    torch.set_num_threads(1)
    def rss():
        with open("/proc/self/status") as handle:
            return next(int(l.split()[1]) for l in handle if l.startswith("VmRSS")) * 1024
    recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}],
              "format": "bitmask"}
    ids = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    def run(folder, out):
        src = load_source(folder, stream=sys.argv[3] == "stream")
        sp.save(sp.compress(src.model, recipe, calibration=ids, weights=src.weights), out, overwrite=True)
    run(sys.argv[4], sys.argv[2])  # a tiny model first: lazy imports, kernels and thread pools start here
    start = rss()
    run(sys.argv[1], sys.argv[2])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"start": start, "peak": peak}))
""")


def _peak_growth(folder: Path, out: Path, mode: str, warm: Path) -> int:
    done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(folder), str(out), mode, str(warm)], capture_output=True,
                          text=True, timeout=600, check=True)
    numbers = json.loads(done.stdout.strip().splitlines()[-1])
    return numbers["peak"] - numbers["start"]


@pytest.mark.slow  # two child compressions of a 403 MB model; its RSS bound failed once inside the busy full suite
def test_streamed_peak_memory_is_bounded_by_one_block_not_the_model(tmp_path):
    """24 blocks of 4.2M weights (403 MB in float32), bf16 on disk, magnitude + RTN int8, each run in a child
    of its own: the in-memory run gains at least the float32 model; the streamed run gains the packed
    blocks, about one float32 block with its solve's work and the fixed costs both runs share, so it
    saves at least half the float32 model."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsepress.stream import parameters_on_meta

    config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=2048, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    with parameters_on_meta():  # the folder is written by hand: building the model would hold it in memory
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tensors = {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    folder = tmp_path / "src"
    folder.mkdir()
    config.save_pretrained(folder)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    fp32_bytes = 4 * sum(t.numel() for t in tensors.values())
    del tensors
    warm = _write(tmp_path / "tiny", "llama")
    streamed = _peak_growth(folder, tmp_path / "out-stream", "stream", warm)
    in_memory = _peak_growth(folder, tmp_path / "out-memory", "memory", warm)
    assert in_memory > fp32_bytes, (in_memory, fp32_bytes)  # the measurement sees the dense model
    # (an absolute bound such as "below the float32 size" was flaky: the fixed costs both runs share, GEMM
    # panels of the packed layers included, moved it by ~80 MB between runs)
    assert streamed < in_memory - fp32_bytes / 2, (streamed, in_memory, fp32_bytes)
    assert load_file(tmp_path / "out-stream" / "sparsepress.safetensors").keys() == \
        load_file(tmp_path / "out-memory" / "sparsepress.safetensors").keys()
