"""Structured removal side by side: pattern x amount -> non-embedding parameters, folder size, latency
(fp32 and int8; sparsepress and plain transformers after export), fidelity (and perplexity for causal
LMs), for all-MiniLM-L6-v2 and the tiny LLaMA fixture.

Each row compresses a fresh copy of the dense model (one-shot, or with `--distill-steps N` distillation),
saves it (`sparsepress.safetensors` + config + manifest: the folder size), and measures:
- `fp32 ms` / `int8 ms`: sparsepress running the saved folder (`sp.load`), the structured model alone
  and with GPTQ int8 on top;
- `hf fp32 ms` / `hf int8 ms`: plain transformers on the exported dense folder (`save_pretrained` of the
  dequantized model; `interop.hf` export where it is available), fp32 and torch dynamic int8;
all timed round-robin in one process against the dense model in torch fp32 (`dense ms`), at
`--batch` x `--seq-len` tokens. Timings are indicative on a shared machine; ratios are in one process.

Example:
    nice -n 19 python benchmarks/structured.py compress --models minilm,tiny-llama
    flock /work/bench.lock python benchmarks/structured.py time --models minilm,tiny-llama --out bench-out/structured.md
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sparsepress as sp
from sparsepress.evaluate import dynamic_int8, fidelity, forward_runner, interleaved_ms, is_causal_lm, perplexity
from sparsepress.models import replace_module
from sparsepress.sources import bundled_text, load_source, token_samples
from sparsepress.structured import block_parameters

TINY_LLAMA = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny-llama"
INT8 = {"quantize": {"method": "gptq", "bits": 8}}


def rows(model_name: str) -> list[tuple[str, dict[str, Any]]]:
    """(label, structured prune stage) per row; the amounts the issue's targets name for MiniLM."""
    if model_name == "minilm":
        heads, layers = 4 / 12, 2 / 6
    else:  # tiny-llama: 4 query heads in 2 KV groups, 4 blocks
        heads, layers = 1 / 2, 1 / 4
    return [
        ("channel 30%", {"pattern": "channel", "sparsity": 0.3, "method": "sparsegpt"}),
        ("channel 50%", {"pattern": "channel", "sparsity": 0.5, "method": "sparsegpt"}),
        (f"heads {heads:.0%}", {"pattern": "head", "sparsity": heads, "method": "sparsegpt"}),
        (f"layers {layers:.0%}", {"pattern": "layer", "sparsity": layers, "score": "loss"}),
    ]


def folder_bytes(folder: Path) -> int:
    """What `ls -l` of the folder adds up to (files only)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dequantized(model: nn.Module) -> nn.Module:
    """A plain transformers model: every SparseLinear back to an nn.Linear of its dequantized weight."""
    plain = copy.deepcopy(model)
    for name, module in list(plain.named_modules()):
        if isinstance(module, sp.SparseLinear):
            linear = nn.Linear(module.packed.in_features, module.packed.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.packed.unpack())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(plain, name, linear)
    return plain


def exported(model: nn.Module, folder: Path) -> nn.Module:
    """Write a plain transformers folder and load it back with plain transformers."""
    plain = dequantized(model)
    if hasattr(plain, "set_attn_implementation"):
        plain.set_attn_implementation("sdpa")
    plain.save_pretrained(folder)
    return type(model).from_pretrained(folder, attn_implementation="sdpa").eval()


def compress_rows(args: argparse.Namespace) -> None:
    """Phase 1 (CPU-heavy: run under nice): compress every row fp32 and int8, save the sparsepress folder
    and its plain export, and record sizes and quality in `rows.json` beside them."""
    for model_name in args.models.split(","):
        source = load_source("minilm" if model_name == "minilm" else TINY_LLAMA)
        dense, tok = source.model, source.tokenizer
        causal = is_causal_lm(dense)
        samples = token_samples(tok, bundled_text("heldout"), 32, 128, seed=1)
        dense_params = block_parameters(dense)
        found: list[dict[str, Any]] = []
        for label, stage in rows(model_name):
            extra = [{"distill": {"steps": args.distill_steps}}] if args.distill_steps else []
            row: dict[str, Any] = {"label": label + (" + distill" if extra else ""), "dense_ppl": perplexity(dense, samples) if causal else None}
            for precision, tail in (("fp32", []), ("int8", [INT8])):
                start = time.perf_counter()
                model = sp.compress(copy.deepcopy(dense), {"stages": [{"prune": stage}, *extra, *tail]},
                                    tokenizer=tok, samples=args.samples)
                folder = args.work / model_name / f"{len(found)}-{precision}"
                sp.save(model, folder, tokenizer=tok, overwrite=True)
                plain = model.sparsepress_record.extra["structured"]["plain_config"]
                if plain:  # a folder whose shapes the config cannot express has no plain export
                    exported(model, args.work / model_name / f"{len(found)}-{precision}-hf")
                loaded = sp.load(folder)
                row[precision] = {"seconds": round(time.perf_counter() - start, 1), "folder": str(folder), "plain": plain,
                                  "mb": folder_bytes(folder) / 1e6, "fidelity": fidelity(loaded, dense, samples),
                                  "params": block_parameters(model) / dense_params,
                                  "ppl": perplexity(loaded, samples) if causal else None}
            print(json.dumps(row), flush=True)
            found.append(row)
        (args.work / model_name / "rows.json").write_text(json.dumps(found, indent=1))


def time_rows(args: argparse.Namespace) -> list[str]:
    """Phase 2 (timing: run under the bench lock): load the saved folders and time them round-robin
    against the dense model; returns the markdown table."""
    import transformers

    lines = [f"batch {args.batch} x {args.seq_len} tokens; torch {torch.__version__}; {args.rounds} rounds", ""]
    for model_name in args.models.split(","):
        source = load_source("minilm" if model_name == "minilm" else TINY_LLAMA)
        dense, tok = source.model, source.tokenizer
        causal = is_causal_lm(dense)
        ids = token_samples(tok, bundled_text("heldout"), args.batch, args.seq_len, seed=2)
        batch = {"input_ids": torch.stack(ids), "attention_mask": torch.ones(args.batch, args.seq_len, dtype=torch.long)}
        found = json.loads((args.work / model_name / "rows.json").read_text())
        lines += ["", f"### {model_name} ({type(dense).__name__})", "",
                  "| rows | params | folder MB fp32 / int8 | fidelity fp32 / int8 | " + ("ppl fp32 / int8 | " if causal else "")
                  + "dense fp32 ms | ours fp32 | ours int8 | hf fp32 | hf dyn int8 |",
                  "|---|---|---|---|" + ("---|" if causal else "") + "---|---|---|---|---|"]
        for index, row in enumerate(found):
            fp32, int8 = row["fp32"], row["int8"]
            runs = {"dense": forward_runner(dense, batch), "fp32": forward_runner(sp.load(fp32["folder"]), batch),
                    "int8": forward_runner(sp.load(int8["folder"]), batch)}
            if fp32["plain"]:
                cls = getattr(transformers, type(dense).__name__)
                hf = cls.from_pretrained(fp32["folder"] + "-hf", attn_implementation="sdpa").eval()
                runs.update({"hf fp32": forward_runner(hf, batch), "hf int8": forward_runner(dynamic_int8(hf), batch)})
            timings = interleaved_ms(runs, rounds=args.rounds)
            speed = {k: f"{v:.1f} ({timings['dense'] / v:.2f}x)" for k, v in timings.items()}
            ppl = f"{fp32['ppl']:.2f} / {int8['ppl']:.2f} (dense {row['dense_ppl']:.2f}) | " if causal else ""
            lines.append(f"| {row['label']}{'' if fp32['plain'] else ' (sparsepress shapes)'} | {fp32['params']:.3f} | "
                         f"{fp32['mb']:.1f} / {int8['mb']:.1f} | {fp32['fidelity']:.4f} / {int8['fidelity']:.4f} | {ppl}"
                         f"{timings['dense']:.1f} | {speed['fp32']} | {speed['int8']} | {speed.get('hf fp32', '– (no plain config)')} | "
                         f"{speed.get('hf int8', '–')} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("compress", "time"))
    parser.add_argument("--models", default="minilm,tiny-llama")
    parser.add_argument("--work", type=Path, default=Path("bench-out/structured"))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows (+ twice as many sentences)")
    parser.add_argument("--distill-steps", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.phase == "compress":
        compress_rows(args)
        return
    lines = time_rows(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
