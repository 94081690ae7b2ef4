"""End-to-end speed: all-MiniLM-L6-v2 compressed (50% + int8) against torch fp32 and torch dynamic int8,
with ONNX Runtime int8 and DeepSparse 1.8.0 as reference rows, plus a LLaMA-shaped decoder's tokens/s.

Every ratio in a table is measured in this one process, on this machine (DeepSparse runs in a child
process of a separate venv: `python -m venv ds && ds/bin/pip install deepsparse==1.8.0`, then pass
`--deepsparse-python ds/bin/python`).

Example:
    python benchmarks/e2e.py --quick
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

import sparsepress as sp
from sparsepress.attention import use_native_attention
from sparsepress.evaluate import dynamic_int8, forward_runner, interleaved_ms
from sparsepress.runtime import native_blocks_of
from sparsepress.sources import load_source, read_text, token_samples

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # llamacpp_runner beside this file


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's word for it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def inputs_for(batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 2000, (batch, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Export a BERT-style encoder with dynamic batch and sequence axes (legacy TorchScript exporter)."""
    example = inputs_for(1, 16)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "seq"} for n in names}
    axes["last_hidden_state"] = {0: "batch", 1: "seq"}

    class Wrapped(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    torch.onnx.export(Wrapped(model).eval(), tuple(example[n] for n in names), str(path), input_names=names,
                      output_names=["last_hidden_state"], dynamic_axes=axes, opset_version=17, dynamo=False)
    return path


def onnxruntime_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_runner(session, batch: int, seq_len: int):
    feed = {k: v.numpy() for k, v in inputs_for(batch, seq_len).items()}
    return lambda: session.run(None, feed)


def deepsparse_ms(python: str, onnx: Path, batch: int, seq_len: int, repeats: int) -> float | None:
    command = [python, str(HERE / "deepsparse_runner.py"), str(onnx), "--batch", str(batch), "--seq-len",
               str(seq_len), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"deepsparse failed: {done.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])["ms"]


def magnitude_pruned(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """A dense fp32 copy with per-row magnitude zeros in every block Linear (what DeepSparse is fed)."""
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layer." in f".{name}":
                weight = module.weight
                keep = int(round(weight.shape[1] * (1 - sparsity)))
                threshold = weight.abs().topk(keep, dim=1).values[:, -1:]
                weight.mul_((weight.abs() >= threshold).float())
    return pruned


# The compressed MiniLMs timed: 50% + int8 in each pattern our kernels run (SparseGPT + GPTQ).
PATTERN_RECIPES = {
    "sparsepress 50% + int8, BBS(64)": "sparsegpt-bbs64-int8.yaml",
    "sparsepress 50% + int8, 2:4": "sparsegpt-2of4-int8.yaml",
    "sparsepress 50% + int8, unstructured": "sparsegpt-50-int8.yaml",
}


def timing_recipe(recipe: sp.Recipe) -> sp.Recipe:
    """The same sparsity, pattern, bits and format with data-light solvers (Wanda + RTN): the packed
    layers run at the same speed, and compression takes seconds instead of minutes (--fast-compress)."""
    stages = []
    for stage in recipe.stages:
        body = stage.model_dump(exclude_none=True)
        if stage.kind == "prune":
            body["method"] = "wanda"
        if stage.kind == "quantize":
            body["method"] = "rtn"
            body.pop("act_order", None)
        stages.append({stage.kind: body})
    return sp.Recipe.model_validate({**recipe.model_dump(exclude_none=True), "stages": stages})


def module_path(model: torch.nn.Module, run):
    """`run` with the model's native Stack switched off for the call (the per-module path)."""
    def wrapped() -> None:
        forward = native_blocks_of(model)
        forward.enabled = False
        try:
            run()
        finally:
            forward.enabled = True
    return wrapped


def minilm_tables(args: argparse.Namespace) -> None:
    source = load_source("minilm")
    dense = source.model
    ids = token_samples(source.tokenizer, read_text(None), args.samples, 128)
    recipes = {name: sp.Recipe.from_yaml(HERE.parent / "recipes" / recipe) for name, recipe in PATTERN_RECIPES.items()}
    if args.fast_compress:
        recipes = {name: timing_recipe(recipe) for name, recipe in recipes.items()}
    compressed = {name: sp.compress(copy.deepcopy(dense), recipe, calibration=ids, tokenizer=source.tokenizer)
                  for name, recipe in recipes.items()}
    for name, model in compressed.items():
        formats = Counter(m.packed.name for m in model.modules() if isinstance(m, sp.SparseLinear))
        print(f"{name}: block Linears stored as " + ", ".join(f"{n} x {c}" for n, c in formats.most_common()))
    # what the attention kernel alone buys: the dense int8 model with sparsepress's attention switched in
    int8_native_attention = dynamic_int8(dense)
    use_native_attention(int8_native_attention)
    models = {"torch fp32 (dense)": dense, "torch dynamic int8 (dense)": dynamic_int8(dense),
              "torch dynamic int8 (dense) + sparsepress attention": int8_native_attention, **compressed}
    workdir = Path(tempfile.mkdtemp(prefix="sp-e2e-"))
    sessions = {}
    if not args.skip_onnx:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        fp32_path = export_onnx(dense, workdir / "dense.onnx")
        quantize_dynamic(str(fp32_path), str(workdir / "dense-int8.onnx"), weight_type=QuantType.QInt8)
        sessions["ONNX Runtime fp32 (dense)"] = onnxruntime_session(fp32_path, torch.get_num_threads())
        sessions["ONNX Runtime int8 (dense)"] = onnxruntime_session(workdir / "dense-int8.onnx",
                                                                    torch.get_num_threads())
    deepsparse_onnx = {}
    if args.deepsparse_python:
        for sparsity in (0.0, 0.5, 0.75, 0.9):
            deepsparse_onnx[sparsity] = export_onnx(magnitude_pruned(dense, sparsity) if sparsity else dense,
                                                    workdir / f"pruned-{int(sparsity * 100)}.onnx")

    for batch, seq_len in ((1, 16), (32, 64)):
        batch_inputs = inputs_for(batch, seq_len)
        batch_inputs.pop("token_type_ids")
        runs = {name: forward_runner(model, batch_inputs) for name, model in models.items()}
        last = list(compressed)[-1]
        if native_blocks_of(compressed[last]) is not None:  # what the native Stack buys over the module path
            runs[f"{last}, module path"] = module_path(compressed[last], forward_runner(compressed[last], batch_inputs))
        per_round = 5 if batch == 1 else 1
        # torch models timed round-robin: a slow phase of the machine hits every one alike
        rows = list(interleaved_ms(runs, rounds=args.repeats, per_round=per_round).items())
        # each ONNX Runtime session alone: its own thread pool spins between runs and would slow
        # whatever ran next in this process
        for name, session in sessions.items():
            rows += interleaved_ms({name: ort_runner(session, batch, seq_len)}, rounds=args.repeats,
                                   per_round=per_round).items()
        for sparsity, path in deepsparse_onnx.items():
            ms = deepsparse_ms(args.deepsparse_python, path, batch, seq_len, max(3, args.repeats))
            if ms is not None:
                rows.append((f"DeepSparse 1.8.0 fp32, magnitude {int(sparsity * 100)}% (own process)", ms))
        print_table(f"all-MiniLM-L6-v2, batch {batch} x {seq_len} tokens", rows)


DECODER = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
           "vocab_size": 32000, "max_position_embeddings": 2048}


def decoder_table(args: argparse.Namespace) -> None:
    """Greedy decode tokens/s of a LLaMA-shaped decoder (TinyLlama-1.1B's shapes, GQA 32/4, vocab 32000,
    random weights, `--decoder-layers` blocks): sparsepress 50% + int8 with an int8 50% lm_head and int8
    embeddings on its native loop, against torch fp32 / dynamic int8 (transformers' generate) and
    llama.cpp Q8_0 / Q4_0 of the same dense weights (each timed alone: its own pool spins)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsepress.runtime.speed import generation_rates

    torch.manual_seed(0)
    config = LlamaConfig(**DECODER, num_hidden_layers=args.decoder_layers, tie_word_embeddings=False)
    dense = LlamaForCausalLM(config).eval()
    ids = [torch.randint(0, DECODER["vocab_size"], (64,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    recipe = {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "rtn", "bits": 8}},
                         {"quantize_embeddings": {"bits": 8, "head": True, "head_sparsity": 0.5}}]}
    compressed = sp.compress(copy.deepcopy(dense), recipe, calibration=ids)
    models = {"torch fp32 (dense)": dense, "torch dynamic int8 (dense)": dynamic_int8(dense),
              "sparsepress 50% + int8 incl. lm_head, native decode loop": compressed}
    rows = generation_rates(models, prompt=args.prompt_tokens, new_tokens=args.decode_tokens, rounds=3)
    if args.llamacpp:
        from llamacpp_runner import llamacpp_rates

        rows += llamacpp_rates(dense, prompt=args.prompt_tokens, new_tokens=args.decode_tokens,
                               threads=torch.get_num_threads())
    base = {name: decode for name, _, decode in rows}
    print(f"\n### LLaMA-shaped decoder ({args.decoder_layers} layers, hidden 2048, FFN 5632, GQA 32/4, vocab 32000), "
          f"batch 1, prompt {args.prompt_tokens}, {args.decode_tokens} greedy tokens\n")
    print("| runtime | prefill tokens/s | decode tokens/s | decode vs torch fp32 | decode vs torch dynamic int8 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, prefill, decode in rows:
        print(f"| {name} | {prefill:.1f} | {decode:.1f} | {decode / base['torch fp32 (dense)']:.2f}x | "
              f"{decode / base['torch dynamic int8 (dense)']:.2f}x |")
    sys.stdout.flush()


def print_table(title: str, rows: list[tuple[str, float]]) -> None:
    base = dict(rows)
    fp32 = base["torch fp32 (dense)"]
    int8 = base["torch dynamic int8 (dense)"]
    print(f"\n### {title}\n")
    print("| runtime | ms | speedup vs torch fp32 | speedup vs torch dynamic int8 |")
    print("| --- | ---: | ---: | ---: |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} | {fp32 / ms:.2f}x | {int8 / ms:.2f}x |")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and calibration samples")
    parser.add_argument("--deepsparse-python", default=os.environ.get("DEEPSPARSE_PYTHON"),
                        help="python of a venv with deepsparse==1.8.0 (reference rows)")
    parser.add_argument("--skip-onnx", action="store_true", help="skip the ONNX Runtime rows")
    parser.add_argument("--skip-decoder", action="store_true")
    parser.add_argument("--decoder-layers", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--fast-compress", action="store_true",
                        help="Wanda + RTN instead of the recipes' SparseGPT + GPTQ (same packed layers, same speed)")
    parser.add_argument("--llamacpp", action="store_true", help="llama.cpp rows (llama-cpp-python and gguf installed)")
    parser.add_argument("--skip-minilm", action="store_true")
    args = parser.parse_args()
    args.repeats = 10 if args.quick else 30
    args.samples = 32 if args.quick else 128
    from sparsepress import native

    print(f"CPU: {cpu_model()}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"sparsepress kernels: {native.active_isa()}")
    if not args.skip_minilm:
        minilm_tables(args)
    if not args.skip_decoder:
        decoder_table(args)


if __name__ == "__main__":
    main()
