"""Quality of activation sparsity: one compressed model per row, every stored level measured side by side.

For each model (the bundled MiniLM, the tiny LLaMA fixture) the row's recipe plus an
`activation_sparsity` stage is compressed once; then `sp.set_activation_sparsity` walks the stored
levels and each is measured on the held-out text exactly as `benchmarks/quality.py` measures its rows
(fidelity, similarity Spearman, perplexity for causal LMs). The proxy column maps the Spearman to the
held-out similarity benchmark by the README's straight line (82.05 dense, 15.5 points per unit).

Example:
    python benchmarks/activation_quality.py --models minilm --out bench-out/activation.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

import sparsepress as sp
from sparsepress.evaluate import is_causal_lm, sentence_pairs
from sparsepress.nn.activation import activation_levels
from sparsepress.sources import bundled_text, load_source, token_samples

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import INT8_EMB, MODELS, Eval, _cell, _prune, _quant, measure

DENSE_SCORE, POINTS_PER_SPEARMAN = 82.05, 15.5
ROWS = {
    "sparsegpt 50% + GPTQ int8": (_prune("sparsegpt", 0.5), _quant("gptq"), INT8_EMB),
    "GPTQ int8 (dense weights)": (_quant("gptq"), INT8_EMB),
}


def run_model(name: str, args: argparse.Namespace) -> list[str]:
    source = load_source(MODELS[name])
    dense, tokenizer = source.model, source.tokenizer
    pad_id = tokenizer.pad_token_id or 0
    heldout = bundled_text("heldout")
    data = Eval(token_samples(tokenizer, heldout, args.eval_samples, args.seq_len, seed=1),
                sentence_pairs(tokenizer, heldout, pairs=args.pairs, seed=1), pad_id, is_causal_lm(dense))
    lines = [f"### {name}", "", "| weights | activation sparsity | fidelity | spearman | proxy score | ppl |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for label, stages in ROWS.items():
        recipe = {"stages": [*stages, {"activation_sparsity": {"sparsity": 0.4}}]}
        start = time.perf_counter()
        model = sp.compress(copy.deepcopy(dense), recipe, tokenizer=tokenizer, samples=args.samples, seq_len=args.seq_len)
        print(f"(compressed in {time.perf_counter() - start:.0f} s)", flush=True)
        for level in activation_levels(model):
            sp.set_activation_sparsity(model, level)
            scores = measure(model, dense, data)
            proxy = DENSE_SCORE - POINTS_PER_SPEARMAN * (1 - scores["spearman"])  # type: ignore[operator]
            line = (f"| {label} | {level:g} | {_cell(scores['fidelity'], 4)} | {_cell(scores['spearman'], 4)} | "
                    f"{proxy:.2f} | {_cell(scores['ppl'], 2)} |")
            print(line, flush=True)
            lines.append(line)
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description="Activation sparsity levels side by side (markdown table).")
    parser.add_argument("--models", default="minilm,tiny-llama")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    lines: list[str] = []
    for name in args.models.split(","):
        lines += run_model(name.strip(), args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
