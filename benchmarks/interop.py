"""What loads what, how faithfully and how fast: all-MiniLM-L6-v2 through every interop path.

For each pattern (50% unstructured, 2:4), with Wanda + RTN int8:
  1. our folder (`sp.compress` + `sp.save`);
  2. an llm-compressor-style folder of the same weights written by the compressed-tensors library
     itself (0.14: scales from our folder, `ModelCompressor`, `sparse-bitmask` / `sparse-24-bitmask` +
     `int-quantized`), read back by `sp.load`;
  3. our folder through `AutoModel.from_pretrained` and `sp.load_sentence_transformer`;
  4. `export --to hf` (dense fp32, plain transformers) and `--to onnx` (fp32, ONNX Runtime dynamic int8).
Fidelity: mean cosine of mean-pooled outputs to the dense model on 64 held-out windows of 128 tokens.
Latency: batch 8 x 64 tokens, torch models timed interleaved in one process, ONNX Runtime sessions alone.

    python benchmarks/interop.py [--out DIR] [--samples N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import sparsepress as sp
from sparsepress.evaluate import fidelity, models_ms
from sparsepress.interop.commands import export_folder
from sparsepress.sources import calibration_samples, load_source, read_text, token_samples

PATTERNS = {"50% unstructured": ("unstructured", "sparse-bitmask"), "2:4": ("2:4", "sparse-24-bitmask")}


def ct_folder_of(packed_folder: Path, source: Path, out: Path, sparse_format: str) -> Path:
    """The same int8 weights, written by the compressed-tensors library as llm-compressor does."""
    import shutil

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    from sparsepress.interop.hf.export import plain_model

    shutil.rmtree(out, ignore_errors=True)
    packed = sp.load(packed_folder)
    model = plain_model(packed)
    names = {n: m for n, m in packed.named_modules() if isinstance(m, sp.SparseLinear)}
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel")
    config = QuantizationConfig(config_groups={"g": QuantizationScheme(targets=sorted(names), weights=args)},
                                quantization_status="frozen")
    apply_quantization_config(model, config)
    for name, layer in names.items():
        model.get_submodule(name).weight_scale.data = layer.packed.scales.reshape(-1, 1).clone()
    sparsity = SparsityCompressionConfig.load_from_registry(
        sparse_format, targets=sorted(names), ignore=[], global_sparsity=0.5,
        sparsity_structure="2:4" if "24" in sparse_format else "unstructured")
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=sparsity, quantization_format="int-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json",
                 "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (source / name).is_file():
            shutil.copy(source / name, out / name)
    for name in ("1_Pooling", "2_Normalize"):
        if (source / name).is_dir():
            shutil.copytree(source / name, out / name)
    return out


def onnx_ms(path: Path, batch: dict[str, torch.Tensor], names: list[str], rounds: int = 10) -> float:
    from sparsepress.interop.onnx import onnx_session

    session = onnx_session(path, torch.get_num_threads())
    feed = {n: batch[n].numpy() for n in names}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def onnx_fidelity(path: Path, names: list[str], reference: torch.nn.Module, samples: list[torch.Tensor]) -> float:
    """Mean cosine of the ONNX graph's mean-pooled outputs (its first output: the last hidden states) to
    `reference`'s on the held-out samples, batched as `fidelity` batches them."""
    from sparsepress.calibration import make_batches
    from sparsepress.evaluate import mean_cosine, mean_pool, pooled_output
    from sparsepress.interop.onnx import onnx_session

    session = onnx_session(path, torch.get_num_threads())
    scores = []
    for batch in make_batches(samples, 16, 0):
        feed = {n: batch[n].numpy() if n in batch else torch.zeros_like(batch["input_ids"]).numpy() for n in names}
        pooled = mean_pool(torch.from_numpy(session.run(None, feed)[0]), batch["attention_mask"])
        scores.append(mean_cosine(pooled, pooled_output(reference, batch)) * len(batch["input_ids"]))
    return sum(scores) / len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--reuse", action="store_true", help="keep our folders already in --out (skip compression)")
    args = parser.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="interop-bench-"))
    source = load_source("minilm")
    held = token_samples(source.tokenizer, read_text(None, "heldout"), args.samples, 128, seed=1234)
    calibration = calibration_samples(source.tokenizer, read_text(None), 64, 128, 0)
    ids = torch.randint(1000, 2000, (8, 64), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    from transformers import AutoModel

    rows = []
    for label, (pattern, sparse_format) in PATTERNS.items():
        recipe = {"stages": [{"prune": {"method": "wanda", "pattern": pattern, "sparsity": 0.5}},
                             {"quantize": {"method": "rtn", "bits": 8}}],
                  "format": "bitmask" if pattern == "unstructured" else "nm"}
        ours = work / f"ours-{pattern.replace(':', '')}"
        if not (args.reuse and (ours / "sparsepress.json").is_file()):
            packed = sp.compress(load_source("minilm").model, recipe, calibration=calibration)
            packed.sparsepress_source = str(source.path)
            sp.save(packed, ours, source=source.path, overwrite=True)
        ct = ct_folder_of(ours, source.path, work / f"ct-{pattern.replace(':', '')}", sparse_format)
        export_folder(ours, "hf", work / f"hf-{pattern.replace(':', '')}", overwrite=True)
        export_folder(ours, "onnx", work / f"onnx-{pattern.replace(':', '')}", overwrite=True, dtype="int8")
        models = {
            "our folder, sp.load": sp.load(ours),
            "compressed-tensors folder (library-written), sp.load": sp.load(ct),
            "our folder, AutoModel.from_pretrained": AutoModel.from_pretrained(ours),
            "our folder, sp.load_sentence_transformer": sp.load_sentence_transformer(ours)[0].auto_model,
            "export --to hf, plain transformers (dense fp32)": AutoModel.from_pretrained(work / f"hf-{pattern.replace(':', '')}"),
            "dense source, torch fp32": source.model,
        }
        latency = models_ms(models, batch, rounds=10)
        for name, model in models.items():
            rows.append({"pattern": label, "path": name, "fidelity": fidelity(model, source.model, held),
                         "ms": latency[name], "vs dense fp32": latency["dense source, torch fp32"] / latency[name]})
        onnx_dir = work / f"onnx-{pattern.replace(':', '')}"
        names = json.loads((onnx_dir / "onnx_export.json").read_text())["inputs"]
        for file in ("model.onnx", "model_int8.onnx"):
            ms = onnx_ms(onnx_dir / file, batch, names)
            rows.append({"pattern": label, "path": f"export --to onnx, ONNX Runtime ({file})",
                         "fidelity": onnx_fidelity(onnx_dir / file, names, source.model, held),
                         "ms": ms, "vs dense fp32": latency["dense source, torch fp32"] / ms})
        print(json.dumps(rows[-8:], indent=1), flush=True)
    print("| pattern | path | fidelity | ms (8 x 64) | vs dense torch fp32 |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['pattern']} | {row['path']} | {row['fidelity']:.4f} | {row['ms']:.1f} | {row['vs dense fp32']:.2f}x |")


if __name__ == "__main__":
    main()
