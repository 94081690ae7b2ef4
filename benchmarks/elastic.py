"""Elastic sparsity levels: quality of each nested level against compressing that level alone, size, speed.

`quality`: all-MiniLM-L6-v2 compressed once per row (SparseGPT / Wanda / magnitude nesting, GPTQ int8,
int8 embeddings) with levels 0.5 / 0.7 / 0.9, and each level alone; every level is measured on two
held-out sets (sentence pairs of the bundled WikiText-2 test sample, and of the full WikiText-2 test
text with another seed): fidelity, pair-similarity Spearman and its reading on the issue's scale
(82.05 - 15.5 x (1 - Spearman)). The folders are kept under --out for `speed`.

`speed`: per level of an elastic folder, the forward latency at batch 1 x 16 and 32 x 64 tokens beside
the single-level folders of the same sparsity (timed round-robin in one process), the time of
`sp.set_sparsity` over all layers, and the bytes each model holds (tensors + GEMM panels).

Example:
    PYTHONPATH=src python benchmarks/elastic.py quality --quick
    PYTHONPATH=src python benchmarks/elastic.py speed --out bench-out/elastic
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import sparsepress as sp
from sparsepress.evaluate import fidelity, interleaved_ms, sentence_pairs, similarity_spearman
from sparsepress.io import TENSORS
from sparsepress.nn.elastic import ElasticLinear
from sparsepress.sources import bundled_text, load_source, token_samples

LEVELS = [0.5, 0.7, 0.9]
FULL_TEST = Path("/work/shared/data/wikitext-2/test.txt")
DENSE_SCORE, SLOPE = 82.05, 15.5


def recipe(method: str, sparsity: float | list[float], quant: str, mask_search: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"stages": [{"prune": {"method": method, "sparsity": sparsity}},
                                       {"quantize": {"method": quant, "bits": 8}},
                                       {"quantize_embeddings": {"bits": 8}}], "format": "bitmask"}
    if mask_search is not None:
        body["solver"] = {"mask_search": mask_search}
    return body


# (key, label, kind, (method, quantizer))
ROWS: list[tuple[str, str, str, tuple[str, str]]] = [
    ("single", "SparseGPT, each level alone", "single", ("sparsegpt", "gptq")),
    ("sparsegpt", "elastic, SparseGPT nesting", "elastic", ("sparsegpt", "gptq")),
    ("wanda", "elastic, Wanda nesting", "elastic", ("wanda", "gptq")),
    ("magnitude", "elastic, magnitude nesting", "elastic", ("magnitude", "gptq")),
    ("lowest", "elastic, SparseGPT nesting, values fitted for 0.5 only", "elastic-lowest", ("sparsegpt", "gptq")),
]


def score(spearman: float) -> float:
    """The issue's held-out scale read from the pair-similarity Spearman (straight line, see README)."""
    return DENSE_SCORE - SLOPE * (1.0 - spearman)


def held_out_sets(tokenizer: Any, pairs: int) -> dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    sets = {"bundled test sample": sentence_pairs(tokenizer, bundled_text("heldout"), pairs=pairs, seed=1)}
    if FULL_TEST.is_file():
        sets["full WikiText-2 test"] = sentence_pairs(tokenizer, FULL_TEST.read_text(), pairs=pairs, seed=7)
    return sets


def measure(model: torch.nn.Module, dense: torch.nn.Module, windows: list[torch.Tensor], sets: dict, pad: int) -> dict:
    out = {"fidelity": fidelity(model, dense, windows, pad_id=pad)}
    for name, (a, b) in sets.items():
        out[name] = similarity_spearman(model, dense, a, b, pad_id=pad)
    return out


def run_quality(args: argparse.Namespace) -> None:
    import sparsepress.prune.nested as nested

    source = load_source("minilm")
    dense, tokenizer = source.model, source.tokenizer
    pad = tokenizer.pad_token_id or 0
    windows = token_samples(tokenizer, bundled_text("heldout"), 64, 128, seed=1)
    sets = held_out_sets(tokenizer, args.pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = ["| nesting | level | fidelity | " + " | ".join(f"spearman ({n}) | score" for n in sets) + " | tensors MB |",
             "|---|---|---|" + "---|---|" * len(sets) + "---|"]
    print("\n".join(lines), flush=True)
    results = {}
    for key, label, kind, (method, quant) in ROWS:
        if args.rows and key not in args.rows:
            continue
        if args.method:  # every row with this method (e.g. magnitude + RTN: data-free folders for `speed`)
            method, quant, label = args.method, "rtn" if args.method == "magnitude" else quant, f"{label} ({args.method})"
        saved = nested.LEVEL_WEIGHTS
        if kind == "elastic-lowest":
            nested.LEVEL_WEIGHTS = (1.0, 0.0)
        try:
            runs = [(LEVELS, f"{kind}-{method}")] if kind != "single" else [(s, f"single-{method}-{s}") for s in args.levels]
            for sparsity, folder_name in runs:
                start = time.perf_counter()
                model = sp.compress(copy.deepcopy(dense), recipe(method, sparsity, quant, args.mask_search),
                                    tokenizer=tokenizer, samples=args.samples)
                seconds = time.perf_counter() - start
                folder = args.out / folder_name
                sp.save(model, folder, source=source.path, overwrite=True)
                size = (folder / TENSORS).stat().st_size / 1e6
                for level in (sparsity if isinstance(sparsity, list) else [sparsity]):
                    if isinstance(sparsity, list):
                        sp.set_sparsity(model, level)
                    got = measure(model, dense, windows, sets, pad)
                    results[f"{label} @ {level}"] = {**got, "tensors_mb": size, "seconds": seconds}
                    cells = " | ".join(f"{got[n]:.4f} | {score(got[n]):.2f}" for n in sets)
                    line = f"| {label} | {level:g} | {got['fidelity']:.4f} | {cells} | {size:.2f} |"
                    print(line, flush=True)
                    lines.append(line)
        finally:
            nested.LEVEL_WEIGHTS = saved
    (args.out / "quality.md").write_text("\n".join(lines) + "\n")
    (args.out / "quality.json").write_text(json.dumps(results, indent=2))


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(tensor bytes, GEMM panel bytes) a loaded model holds: packed weights, dense tensors, embeddings."""
    from sparsepress import kernels

    seen, total, panels = set(), 0, 0
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if packed is None:
            continue
        if isinstance(module, ElasticLinear):
            total += packed.resident_nbytes
            handle = kernels.elastic_native_plan(packed)
            panels += handle.panel_bytes if handle is not None else 0
        else:
            total += sum(t.numel() * t.element_size() for t in packed.tensors().values())
            plan = packed.__dict__.get("_sparsepress_native_plan")
            if plan is not None:
                panels += plan.handle.panel_bytes
                values = plan.tensors[1]
                if values.data_ptr() != packed.values.data_ptr():  # int4 widened, nm indices turned to bits
                    total += values.numel() * values.element_size()
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total, panels


def run_speed(args: argparse.Namespace) -> None:
    method = args.method or "sparsegpt"
    elastic_dir = args.out / f"elastic-{method}"
    singles = {s: args.out / f"single-{method}-{s}" for s in LEVELS}
    elastic = sp.load(elastic_dir)
    models = {f"single {s:g}": sp.load(folder) for s, folder in singles.items() if folder.is_dir()}
    gen = torch.Generator().manual_seed(0)
    for batch, seq in ((1, 16), (32, 64)):
        ids = torch.randint(1000, 2000, (batch, seq), generator=gen)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def forward(model: torch.nn.Module, level: float | None = None):
            def run() -> None:
                if level is not None:
                    sp.set_sparsity(model, level)
                with torch.inference_mode():
                    model(**inputs)
            return run

        runs = {f"elastic {s:g}": forward(elastic, s) for s in LEVELS}
        runs.update({name: forward(model) for name, model in models.items()})
        times = interleaved_ms(runs, rounds=args.rounds, warmup=2)
        print(f"batch {batch} x {seq}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()), flush=True)
        print(f"  elastic 0.5 / 0.9: {times['elastic 0.5'] / times['elastic 0.9']:.2f}x; "
              f"elastic / single at each level: " + ", ".join(
                  f"{s:g} {times[f'elastic {s:g}'] / times[f'single {s:g}']:.2f}x" for s in LEVELS
                  if f"single {s:g}" in times), flush=True)
        for name, model in [("elastic", elastic), *models.items()]:
            tensors, panels = held_bytes(model)
            print(f"  held by {name}: tensors {tensors / 1e6:.2f} MB + panels {panels / 1e6:.2f} MB "
                  f"= {(tensors + panels) / 1e6:.2f} MB", flush=True)
    switch = []
    for _ in range(50):
        for level in (0.9, 0.5):
            start = time.perf_counter()
            sp.set_sparsity(elastic, level)
            switch.append((time.perf_counter() - start) * 1000)
    print(f"set_sparsity over all layers: median {statistics.median(switch):.4f} ms, max {max(switch):.4f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["quality", "speed"])
    parser.add_argument("--out", type=Path, default=Path("bench-out/elastic"))
    parser.add_argument("--quick", action="store_true", help="32 calibration windows, no mask search, 256 pairs")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--pairs", type=int, default=None)
    parser.add_argument("--mask-search", type=int, default=None)
    parser.add_argument("--rows", nargs="*", default=None, help=f"only these rows: {', '.join(r[0] for r in ROWS)}")
    parser.add_argument("--levels", type=float, nargs="*", default=LEVELS, help="single-level rows to run")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--method", default=None, help="override every row's method (magnitude: with RTN)")
    args = parser.parse_args()
    args.samples = args.samples or (32 if args.quick else 128)
    args.pairs = args.pairs or (256 if args.quick else 1024)
    if args.quick and args.mask_search is None:
        args.mask_search = 0
    torch.manual_seed(0)
    {"quality": run_quality, "speed": run_speed}[args.what](args)


if __name__ == "__main__":
    main()
