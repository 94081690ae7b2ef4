"""Greedy decode of a LLaMA-shaped decoder at each activation-sparsity level: tokens/s on the native decode
loop, int8 weights dense and 50% sparse, levels switched at run time on one loaded model.

The model has TinyLlama-1.1B's shapes (hidden 2048, FFN 5632, GQA 32/4, vocab 32000) with random weights
(speed does not depend on them) and `--layers` blocks; every block Linear gets activation thresholds
calibrated on random prompts. Rounds alternate the levels so a slow phase of a shared machine hits all
alike; medians are reported.

Example:
    python benchmarks/activation_decode.py --layers 4 --tokens 32
    python benchmarks/activation_decode.py --layers 22 --weights dense   # TinyLlama-1.1B's depth
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sparsepress as sp
from sparsepress import native
from sparsepress.runtime import NativeDecoder, use_native_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import DECODER, cpu_model  # noqa: E402

LEVELS = [0.0, 0.25, 0.4, 0.5]


def compressed(dense: torch.nn.Module, weight_sparsity: float, calibration: list[torch.Tensor]) -> torch.nn.Module:
    stages: list[dict] = []
    if weight_sparsity > 0:
        stages.append({"prune": {"method": "wanda", "sparsity": weight_sparsity}})
    stages += [{"quantize": {"method": "rtn", "bits": 8}}, {"quantize_embeddings": {"bits": 8, "head": True}},
               {"activation_sparsity": {"sparsity": 0.4, "levels": [v for v in LEVELS if v > 0]}}]
    return sp.compress(copy.deepcopy(dense), {"stages": stages}, calibration=calibration)


def decode_rates(model: torch.nn.Module, prompt: int, tokens: int, rounds: int) -> dict[float, float]:
    """Decode tokens/s per activation level (median over rounds, levels alternating)."""
    # Random weights: deep random stacks amplify rounding differences past the install check's
    # tolerance (a 22-block one differs by 2.5% from its module path at level 0), so the check that
    # guards trained models is skipped here; speed does not depend on the values.
    use_native_blocks(model, check=False)
    decoder = NativeDecoder(model)
    ids = torch.randint(0, DECODER["vocab_size"], (1, prompt), generator=torch.Generator().manual_seed(0))
    samples: dict[float, list[float]] = {level: [] for level in LEVELS}
    for warm in (True, False):
        for _ in range(1 if warm else rounds):
            for level in LEVELS:
                sp.set_activation_sparsity(model, level)
                with torch.inference_mode():
                    decoder.generate(ids, tokens)
                if not warm:
                    samples[level].append(decoder.timing.decode_tokens_per_s)
    return {level: statistics.median(v) for level, v in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--weights", choices=["dense", "sparse", "both"], default="both",
                        help="int8 weights dense, 50%% sparse, or both rows")
    args = parser.parse_args()
    if not native.native_available():
        raise SystemExit("the native extension is not built")
    torch.manual_seed(0)
    config = LlamaConfig(**DECODER, num_hidden_layers=args.layers, tie_word_embeddings=False)
    dense = LlamaForCausalLM(config).eval()
    calibration = [torch.randint(0, DECODER["vocab_size"], (64,), generator=torch.Generator().manual_seed(i))
                   for i in range(8)]
    print(f"\nCPU: {cpu_model()}; ISA tree {native.active_isa()}; threads {torch.get_num_threads()}; "
          f"{args.layers} blocks, hidden 2048, FFN 5632, GQA 32/4, vocab 32000; batch 1, prompt {args.prompt}, "
          f"{args.tokens} greedy tokens\n")
    print("| weights | " + " | ".join(f"act. {v:g} tok/s" for v in LEVELS) + " | " +
          " | ".join(f"{v:g} vs 0" for v in LEVELS[1:]) + " |")
    print("| --- |" + " ---: |" * (2 * len(LEVELS) - 1))
    variants = {"dense": [("dense int8", 0.0)], "sparse": [("50% + int8", 0.5)]}
    chosen = variants["dense"] + variants["sparse"] if args.weights == "both" else variants[args.weights]
    for label, weight_sparsity in chosen:
        model = compressed(dense, weight_sparsity, calibration)
        rates = decode_rates(model, args.prompt, args.tokens, args.rounds)
        print(f"| {label} | " + " | ".join(f"{rates[v]:.1f}" for v in LEVELS) + " | " +
              " | ".join(f"{rates[v] / rates[0.0]:.2f}x" for v in LEVELS[1:]) + " |")
        sys.stdout.flush()
        del model


if __name__ == "__main__":
    main()
