"""Quality side by side: method x pattern x sparsity -> fidelity, similarity Spearman, perplexity, size.

For each model (the bundled MiniLM, the tiny LLaMA fixture trained on WikiText-2) every row compresses a
fresh copy of the dense model with calibration windows of the bundled WikiText-2 validation text, then
measures on the bundled held-out (WikiText-2 test) text:

- fidelity: mean cosine of mean-pooled final hidden states to the dense model's (`evaluate.fidelity`);
- spearman: rank correlation of sentence-pair cosine similarities, compressed vs dense
  (`evaluate.similarity_spearman`, half neighbouring and half random sentence pairs);
- ppl: perplexity on held-out windows (causal LMs only);
- size: bytes of the saved `sparsepress.safetensors` over the dense model's float32 tensor bytes.

Example:
    PYTHONPATH=src python benchmarks/quality.py --quick
    PYTHONPATH=src python benchmarks/quality.py --models tiny-llama --out bench-out/quality.md
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsepress as sp
from sparsepress.evaluate import fidelity, is_causal_lm, perplexity, sentence_pairs, similarity_spearman
from sparsepress.io import TENSORS
from sparsepress.sources import bundled_text, load_source, token_samples

TINY_LLAMA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-llama"
MODELS = {"minilm": "minilm", "tiny-llama": str(TINY_LLAMA)}
INT8_EMB = {"quantize_embeddings": {"bits": 8}}


def _prune(method: str, sparsity: float | None = None, pattern: str = "unstructured", **extra: Any) -> dict:
    stage: dict[str, Any] = {"method": method, "pattern": pattern, **extra}
    if sparsity is not None:
        stage["sparsity"] = sparsity
    return {"prune": stage}


def _quant(method: str, bits: int = 8, group_size: int | None = None) -> dict:
    return {"quantize": {"method": method, "bits": bits, "group_size": group_size}}


@dataclass(frozen=True)
class Row:
    """One table row: a label, the pattern/sparsity/precision it stands for, and its recipe."""

    method: str
    pattern: str
    sparsity: str
    weights: str
    stages: tuple[dict, ...]
    quick: bool = True
    fmt: str = "auto"

    def recipe(self) -> dict:
        return {"stages": list(self.stages), "format": self.fmt}


ROWS = [
    Row("magnitude", "unstructured", "50%", "fp32", (_prune("magnitude", 0.5),), quick=False),
    Row("magnitude + RTN", "unstructured", "50%", "int8", (_prune("magnitude", 0.5), _quant("rtn"), INT8_EMB)),
    Row("wanda", "unstructured", "50%", "fp32", (_prune("wanda", 0.5),), quick=False),
    Row("wanda + RTN", "unstructured", "50%", "int8", (_prune("wanda", 0.5), _quant("rtn"), INT8_EMB)),
    Row("sparsegpt", "unstructured", "50%", "fp32", (_prune("sparsegpt", 0.5),), quick=False),
    Row("sparsegpt + GPTQ", "unstructured", "50%", "int8", (_prune("sparsegpt", 0.5), _quant("gptq"), INT8_EMB)),
    Row("wanda + RTN", "2:4", "50%", "int8", (_prune("wanda", pattern="2:4"), _quant("rtn"), INT8_EMB), quick=False),
    Row("sparsegpt + GPTQ", "2:4", "50%", "int8", (_prune("sparsegpt", pattern="2:4"), _quant("gptq"), INT8_EMB), fmt="nm"),
    Row("sparsegpt + GPTQ", "bbs(64)", "50%", "int8",
        (_prune("sparsegpt", 0.5, pattern="bbs", bank=64), _quant("gptq"), INT8_EMB), fmt="bbs"),
    Row("wanda + RTN", "unstructured", "70% uniform", "int8", (_prune("wanda", 0.7), _quant("rtn"), INT8_EMB), quick=False),
    Row("wanda + RTN", "unstructured", "70% OWL", "int8",
        (_prune("wanda", 0.7, allocation="owl"), _quant("rtn"), INT8_EMB), quick=False),
    Row("sparsegpt + GPTQ", "unstructured", "70% uniform", "int8", (_prune("sparsegpt", 0.7), _quant("gptq"), INT8_EMB)),
    Row("sparsegpt + GPTQ", "unstructured", "70% OWL", "int8",
        (_prune("sparsegpt", 0.7, allocation="owl"), _quant("gptq"), INT8_EMB)),
    Row("RTN", "dense", "0%", "int4 g128", (_quant("rtn", 4, 128), INT8_EMB), quick=False, fmt="dense"),
    Row("GPTQ", "dense", "0%", "int4 g128", (_quant("gptq", 4, 128), INT8_EMB), fmt="dense"),
]


def dense_bytes(model: nn.Module) -> int:
    """float32 bytes of every distinct tensor of the model (tied tables counted once).

    Example:
        >>> dense_bytes(torch.nn.Linear(2, 3))
        36
    """
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * 4
    return total


def saved_bytes(model: nn.Module) -> int:
    """Size on disk of the model's sparsepress tensors file."""
    with tempfile.TemporaryDirectory() as folder:
        sp.save(model, Path(folder) / "m")
        return (Path(folder) / "m" / TENSORS).stat().st_size


@dataclass
class Eval:
    """Held-out data of one model and the dense model's own scores."""

    samples: list[torch.Tensor]
    pairs: tuple[list[torch.Tensor], list[torch.Tensor]]
    pad_id: int
    causal: bool


def measure(model: nn.Module, dense: nn.Module, data: Eval) -> dict[str, float | None]:
    return {
        "fidelity": fidelity(model, dense, data.samples, pad_id=data.pad_id),
        "spearman": similarity_spearman(model, dense, *data.pairs, pad_id=data.pad_id),
        "ppl": perplexity(model, data.samples, pad_id=data.pad_id) if data.causal else None,
    }


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def run_model(name: str, args: argparse.Namespace) -> list[str]:
    source = load_source(MODELS[name])
    dense, tokenizer = source.model, source.tokenizer
    pad_id = tokenizer.pad_token_id or 0
    heldout = bundled_text("heldout")
    data = Eval(token_samples(tokenizer, heldout, args.eval_samples, args.seq_len, seed=1),
                sentence_pairs(tokenizer, heldout, pairs=args.pairs, seed=1), pad_id, is_causal_lm(dense))
    base = measure(dense, dense, data)
    total = dense_bytes(dense)
    lines = [f"### {name} ({type(dense).__name__}, {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M parameters)", "",
             "| method | pattern | sparsity | weights | fidelity | spearman | ppl | size | time s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| dense | – | 0% | fp32 | 1.0000 | 1.0000 | {_cell(base['ppl'], 2)} | 1.000 | – |"]
    print("\n".join(lines), flush=True)
    rows = [r for r in ROWS if r.quick or not args.quick]
    for row in rows:
        start = time.perf_counter()
        model = sp.compress(copy.deepcopy(dense), row.recipe(), tokenizer=tokenizer, samples=args.samples,
                            seq_len=args.seq_len)
        seconds = time.perf_counter() - start
        scores = measure(model, dense, data)
        size = saved_bytes(model) / total
        line = (f"| {row.method} | {row.pattern} | {row.sparsity} | {row.weights} | {_cell(scores['fidelity'], 4)} | "
                f"{_cell(scores['spearman'], 4)} | {_cell(scores['ppl'], 2)} | {size:.3f} | {seconds:.0f} |")
        print(line, flush=True)
        lines.append(line)
        del model
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description="Quality of compression methods side by side (markdown table).")
    parser.add_argument("--models", default="minilm,tiny-llama", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="fewer rows, calibration and held-out samples")
    parser.add_argument("--samples", type=int, default=None, help="calibration windows (default 128, quick 32)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out windows (default 64, quick 32)")
    parser.add_argument("--pairs", type=int, default=None, help="sentence pairs (default 256, quick 128)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args()
    args.samples = args.samples or (32 if args.quick else 128)
    args.eval_samples = args.eval_samples or (32 if args.quick else 64)
    args.pairs = args.pairs or (128 if args.quick else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    header = [f"calibration: {args.samples} windows of {args.seq_len} tokens + {2 * args.samples} sentences of WikiText-2 valid; held-out: {args.eval_samples} "
              f"windows, {args.pairs} sentence pairs of WikiText-2 test; torch {torch.__version__}", ""]
    print(header[0], flush=True)
    lines = header
    for name in args.models.split(","):
        lines += run_model(name.strip(), args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
