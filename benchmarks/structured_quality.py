"""Quality of structured removal and distillation on all-MiniLM-L6-v2, read on two held-out sets.

One row per recipe: fidelity (pooled cosine to the dense model, 32 held-out windows), the similarity
Spearman over 1024 sentence pairs of the bundled held-out text (set A, the README's proxy) and over
1024 pairs of other WikiText-2 test text (set B), each mapped to the held-out benchmark's scale by the
README's line (82.05 - 15.5 x (1 - spearman)); non-embedding parameters over dense; compression time.

Example:
    nice -n 19 python benchmarks/structured_quality.py --rows channel50-distill --steps 300
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import sparsepress as sp
from sparsepress.calibration import make_batches, to_token_ids
from sparsepress.distill import distill_
from sparsepress.recipe import DistillStage
from sparsepress.evaluate import pooled_output, sentence_pairs, spearman
from sparsepress.sources import bundled_text, load_source, token_samples
from sparsepress.structured import block_parameters

SHARED_TEST = Path("/work/shared/data/wikitext-2/test.txt")
INT8 = {"quantize": {"method": "gptq", "bits": 8}}


def distill(steps: int, **extra) -> dict:
    return {"distill": {"steps": steps, **extra}}


def rows(steps: int) -> dict[str, list[dict]]:
    return {
        "channel50": [{"prune": {"method": "sparsegpt", "pattern": "channel", "sparsity": 0.5}}],
        "channel50-wanda": [{"prune": {"method": "wanda", "pattern": "channel", "sparsity": 0.5}}],
        "channel50-taylor": [{"prune": {"method": "sparsegpt", "pattern": "channel", "sparsity": 0.5, "score": "taylor"}}],
        "channel50-distill": [{"prune": {"method": "sparsegpt", "pattern": "channel", "sparsity": 0.5}}, distill(steps)],
        "heads4": [{"prune": {"method": "sparsegpt", "pattern": "head", "sparsity": 4 / 12}}],
        "heads4-distill": [{"prune": {"method": "sparsegpt", "pattern": "head", "sparsity": 4 / 12}}, distill(steps)],
        "layers2": [{"prune": {"pattern": "layer", "sparsity": 2 / 6, "score": "loss"}}],
        "layers2-influence": [{"prune": {"pattern": "layer", "sparsity": 2 / 6, "score": "influence"}}],
        "layers2-distill": [{"prune": {"pattern": "layer", "sparsity": 2 / 6, "score": "loss"}}, distill(steps)],
        "owl70-int8": [{"prune": {"method": "sparsegpt", "sparsity": 0.7, "allocation": "owl"}}, INT8],
        "owl70-distill-int8": [{"prune": {"method": "sparsegpt", "sparsity": 0.7, "allocation": "owl"}}, distill(steps), INT8],
        "bbs-int8": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "bbs"}}, INT8],
        "bbs-distill-int8": [{"prune": {"method": "sparsegpt", "sparsity": 0.5, "pattern": "bbs"}}, distill(steps), INT8],
        "nm24-int8": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}, INT8],
        "nm24-distill-int8": [{"prune": {"method": "sparsegpt", "pattern": "2:4"}}, distill(steps), INT8],
        "channel30-sgpt50-int8": [{"prune": {"method": "sparsegpt", "pattern": "channel", "sparsity": 0.3}},
                                  {"prune": {"method": "sparsegpt", "sparsity": 0.5}}, INT8],
    }


def progress(what: str, done: int, total: int) -> None:
    if what == "distilling" and (done % 25 == 0 or done == total):
        print(f"  {what} {done}/{total} {time.strftime('%H:%M:%S')}", flush=True)


def proxy(spearman: float) -> float:
    """The README's straight line from the similarity Spearman to the held-out benchmark's scale."""
    return 82.05 - 15.5 * (1.0 - spearman)


def embed(model: torch.nn.Module, samples: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([pooled_output(model, batch) for batch in make_batches(samples, 32, 0)])


class HeldOut:
    """Held-out windows and two pair sets, with the dense model's embeddings computed once."""

    def __init__(self, dense: torch.nn.Module, windows: list[torch.Tensor], sets: dict[str, tuple], cache: Path):
        self.windows, self.sets = windows, sets
        key = f"{len(windows)}-" + "-".join(f"{k}{len(v[0])}" for k, v in sets.items())
        path = cache / f"dense-refs-{key}.safetensors"
        if path.is_file():  # the dense model's side is the same for every row: computed once
            refs = load_file(str(path))
        else:
            refs = {"windows": embed(dense, windows), **{k: self._sims(dense, pairs) for k, pairs in sets.items()}}
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(refs, str(path.with_suffix(".tmp")))
            path.with_suffix(".tmp").rename(path)
        self.dense_windows = refs["windows"]
        self.dense_sims = {k: refs[k] for k in sets}

    @staticmethod
    def _sims(model: torch.nn.Module, pairs: tuple) -> torch.Tensor:
        a, b = embed(model, pairs[0]), embed(model, pairs[1])
        return torch.nn.functional.cosine_similarity(a, b, dim=-1)

    def measure(self, model: torch.nn.Module) -> dict[str, float]:
        cos = torch.nn.functional.cosine_similarity(embed(model, self.windows), self.dense_windows, dim=-1)
        row = {"fidelity": round(float(cos.mean()), 4)}
        for label, pairs in self.sets.items():
            rho = spearman(self._sims(model, pairs), self.dense_sims[label])
            row[f"spearman_{label}"] = round(rho, 4)
            row[f"proxy_{label}"] = round(proxy(rho), 2)
        return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", default="channel50")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--pairs", type=int, default=1024, help="pairs of set A (the README's proxy)")
    parser.add_argument("--pairs-b", type=int, default=256, help="pairs of set B (other WikiText-2 test text)")
    parser.add_argument("--windows", type=int, default=32, help="held-out windows for fidelity")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--extra", default="{}", help="JSON merged into every distill stage")
    parser.add_argument("--out", type=Path, default=Path("bench-out/structured-quality.jsonl"))
    args = parser.parse_args()
    torch.manual_seed(0)
    source = load_source("minilm")
    dense, tok = source.model, source.tokenizer
    heldout = bundled_text("heldout")
    windows = token_samples(tok, heldout, args.windows, 128, seed=1)
    set_a = sentence_pairs(tok, heldout, pairs=args.pairs, seed=1)
    other = SHARED_TEST.read_text(encoding="utf-8")
    other = other[len(other) // 3:]  # past the bundled excerpt's region
    set_b = sentence_pairs(tok, other, pairs=args.pairs_b, seed=2)
    dense_params = block_parameters(dense)
    held = HeldOut(dense, windows, {"A": set_a, "B": set_b}, args.out.parent)
    table = rows(args.steps)
    extra = json.loads(args.extra)
    def emit(row: dict) -> None:
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")

    for name in args.rows.split(","):
        stages = copy.deepcopy(table[name])
        for stage in stages:
            if "distill" in stage:
                stage["distill"].update(extra)
        distill_stage = next((s["distill"] for s in stages if "distill" in s), None)
        only_structured = distill_stage is not None and len(stages) == 2 and "pattern" in stages[0]["prune"] and \
            stages[0]["prune"]["pattern"] in ("channel", "head", "layer")
        start = time.perf_counter()
        compress_stages = stages[:1] if only_structured else stages
        model = sp.compress(copy.deepcopy(dense), {"stages": compress_stages}, tokenizer=tok, samples=args.samples,
                            progress=progress)
        seconds = time.perf_counter() - start
        row = {"row": name, "stages": stages, "seconds": round(seconds, 1),
               "params": round(block_parameters(model) / dense_params, 4)}
        if only_structured:
            # One-shot first, then the very call DistillPass makes, so one run gives before and after.
            emit({**row, "row": name + " (one-shot)", **held.measure(model)})
            record = model.sparsepress_record.extra["structured"]
            samples = to_token_ids(None, tok, args.samples, 128, 0)
            start = time.perf_counter()
            history = distill_(model, dense, samples, DistillStage(**distill_stage), seed=0,
                               block_map=[b["source_index"] for b in record["blocks"]], pad_id=tok.pad_token_id or 0,
                               progress=progress)
            row["seconds"] = round(time.perf_counter() - start, 1)
            row["distill"] = {"first_loss": history[0], "last_loss": history[-1]}
        distill_record = model.sparsepress_record.extra.get("distill")
        if distill_record:
            row["distill"] = distill_record
        emit({**row, **held.measure(model)})


if __name__ == "__main__":
    main()
