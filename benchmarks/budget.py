"""Budgets on all-MiniLM-L6-v2: what a size, latency or fidelity budget gives, against hand-written recipes.

`size`: `budget: {size_mb: 12}` -> the tensors file's bytes, fidelity, pair-similarity Spearman on two
held-out sets and its reading on the issue's scale (82.05 - 15.5 x (1 - Spearman)), the allocation.
`fidelity`: `budget: {min_fidelity: F}` -> the folder's size and `sparsepress eval` fidelity beside
hand-written recipes (uniform sparsity x embedding bits), and the ratio to the smallest one meeting F.
`latency`: `budget: {latency_ms: X, batch: B, seq_len: L}` -> the saved folder reloaded and timed at
B x L (median of interleaved rounds), against the budget.

Example:
    PYTHONPATH=src python benchmarks/budget.py size --out bench-out/budget
    PYTHONPATH=src python benchmarks/budget.py fidelity --min-fidelity 0.9
    PYTHONPATH=src python benchmarks/budget.py latency --latency-ms 60 --batch 8 --seq-len 64
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

import sparsepress as sp
from sparsepress.cli import evaluate_folder
from sparsepress.evaluate import interleaved_ms, sentence_pairs, similarity_spearman
from sparsepress.io import TENSORS
from sparsepress.sources import bundled_text, load_source

FULL_TEST = Path("/work/shared/data/wikitext-2/test.txt")


def budget_recipe(budget: dict[str, Any], mask_search: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"stages": [{"prune": {"method": "sparsegpt"}}, {"quantize": {"method": "gptq"}}],
                            "budget": budget}
    if mask_search is not None:
        body["solver"] = {"mask_search": mask_search}
    return body


def hand_recipe(sparsity: float, embedding_bits: int, mask_search: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": sparsity}},
                                       {"quantize": {"method": "gptq"}},
                                       {"quantize_embeddings": {"bits": embedding_bits}}], "format": "bitmask"}
    if mask_search is not None:
        body["solver"] = {"mask_search": mask_search}
    return body


def compress_to(folder: Path, recipe: dict[str, Any], source: Any, samples: int) -> tuple[Any, float]:
    start = time.perf_counter()
    model = sp.compress(copy.deepcopy(source.model), recipe, tokenizer=source.tokenizer, samples=samples)
    seconds = time.perf_counter() - start
    sp.save(model, folder, source=source.path, overwrite=True)
    return model, seconds


def spearmans(model: Any, source: Any, pairs: int) -> dict[str, float]:
    tok, pad = source.tokenizer, source.tokenizer.pad_token_id or 0
    sets = {"bundled test sample": sentence_pairs(tok, bundled_text("heldout"), pairs=pairs, seed=1)}
    if FULL_TEST.is_file():
        sets["full WikiText-2 test"] = sentence_pairs(tok, FULL_TEST.read_text(), pairs=pairs, seed=7)
    return {name: similarity_spearman(model, source.model, a, b, pad_id=pad) for name, (a, b) in sets.items()}


def report(folder: Path, model: Any, source: Any, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    size = (folder / TENSORS).stat().st_size
    fid = evaluate_folder(folder, None, None)["fidelity"]
    rho = spearmans(model, source, args.pairs)
    manifest = json.loads((folder / "sparsepress.json").read_text())
    row = {"folder": str(folder), "tensors_bytes": size, "fidelity": fid, "spearman": rho,
           "score": {k: 82.05 - 15.5 * (1 - v) for k, v in rho.items()}, "seconds": seconds,
           "budget": {k: manifest["budget"][k] for k in ("target", "predicted", "achieved", "layers", "embeddings")}
           if manifest.get("budget") else None}
    print(json.dumps({k: v for k, v in row.items() if k != "budget"}, indent=1), flush=True)
    if row["budget"]:
        print(json.dumps({k: row["budget"][k] for k in ("predicted", "achieved", "embeddings")}), flush=True)
        counts: dict[str, int] = {}
        for choice in row["budget"]["layers"].values():
            counts[choice] = counts.get(choice, 0) + 1
        print("layer choices:", counts, flush=True)
    return row


def run_size(args: argparse.Namespace, source: Any) -> None:
    folder = args.out / f"size-{args.size_mb:g}"
    model, seconds = compress_to(folder, budget_recipe({"size_mb": args.size_mb}, args.mask_search), source, args.samples)
    row = report(folder, model, source, args, seconds)
    print(f"tensors {row['tensors_bytes']:,} bytes against {args.size_mb * 1e6:,.0f}: "
          f"{'met' if row['tensors_bytes'] <= args.size_mb * 1e6 else 'MISSED'}")


def run_fidelity(args: argparse.Namespace, source: Any) -> None:
    rows = {}
    folder = args.out / f"fidelity-{args.min_fidelity:g}"
    model, seconds = compress_to(folder, budget_recipe({"min_fidelity": args.min_fidelity}, args.mask_search),
                                 source, args.samples)
    rows["budget"] = report(folder, model, source, args, seconds)
    for sparsity in args.hand_sparsities:
        for bits in (8, 4):
            hand = args.out / f"hand-{sparsity:g}-emb{bits}"
            model, seconds = compress_to(hand, hand_recipe(sparsity, bits, args.mask_search), source, args.samples)
            rows[f"sparsegpt {sparsity:g} int8, int{bits} embeddings"] = report(hand, model, source, args, seconds)
    meeting = {k: v for k, v in rows.items() if k != "budget" and v["fidelity"] >= args.min_fidelity}
    print("| recipe | tensors MB | fidelity |\n|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['tensors_bytes'] / 1e6:.2f} | {row['fidelity']:.4f} |")
    if meeting:
        best = min(meeting.values(), key=lambda r: r["tensors_bytes"])
        print(f"budget folder / smallest hand recipe meeting {args.min_fidelity}: "
              f"{rows['budget']['tensors_bytes'] / best['tensors_bytes']:.3f}x")


def run_latency(args: argparse.Namespace, source: Any) -> None:
    budget = {"latency_ms": args.latency_ms, "batch": args.batch, "seq_len": args.seq_len}
    folder = args.out / f"latency-{args.latency_ms:g}"
    model, seconds = compress_to(folder, budget_recipe(budget, args.mask_search), source, args.samples)
    report(folder, model, source, args, seconds)
    loaded = sp.load(folder)
    ids = torch.randint(1000, 2000, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def run() -> None:
        with torch.inference_mode():
            loaded(**inputs)

    measured = interleaved_ms({"folder": run}, rounds=args.rounds, warmup=3)["folder"]
    print(f"latency at batch {args.batch} x {args.seq_len}: {measured:.2f} ms against the budget {args.latency_ms:g} ms "
          f"({measured / args.latency_ms:.3f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["size", "fidelity", "latency"])
    parser.add_argument("--out", type=Path, default=Path("bench-out/budget"))
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--mask-search", type=int, default=None)
    parser.add_argument("--size-mb", type=float, default=12.0)
    parser.add_argument("--min-fidelity", type=float, default=0.9)
    parser.add_argument("--hand-sparsities", type=float, nargs="*", default=[0.5, 0.6])
    parser.add_argument("--latency-ms", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    source = load_source("minilm")
    {"size": run_size, "fidelity": run_fidelity, "latency": run_latency}[args.what](args, source)


if __name__ == "__main__":
    main()
