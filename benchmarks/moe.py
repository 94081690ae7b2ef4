"""Mixture-of-experts benchmarks: quality on the tiny MoE fixture, decode speed on MoE-shaped weights.

quality (tests/fixtures/tiny-moe, perplexity on WikiText-2 test windows, calibration on the bundled
WikiText-2 validation sample):
- expert removal, 25% of each layer's experts, by reap / frequency / gate_mass, merged, and at random
  (mean of 3 seeds): perplexity and its rise over the dense model;
- adaptive routing: experts evaluated per token and perplexity at each calibrated top_p;
- 50% weight sparsity (SparseGPT): uniform against usage-based per-expert allocation.
`--holdout` measures on the fixture's held-out validation tail instead (what settings were chosen on).

speed (random weights, a Qwen3-MoE-shaped decoder: hidden 2048, 16 experts top-2, expert intermediate
1408, 8 layers): greedy decode tokens/s of transformers' own fp32 model and of sparsepress dense int8 and
50% + int8 (magnitude + RTN: data-free on random weights), measured round-robin in one process; each
sparsepress model twice: the native decode loop (`sparsepress.runtime.generate`, one native call per
token, MoE blocks in the Stack) and the module path (transformers' `generate()`: its MoE blocks with
sparsepress's grouped expert layer inside), and prefill likewise (native Stack / modules); the packed
bytes read per token (counted by the grouped kernel) against what the selected experts hold.
`prepare` builds and compresses the models into a folder (untimed); `speed` loads and times them. The fp32
model takes ~4.4 GB, so the two comparisons run one after the other, each side by side (peak ~5.5 GB).

Example:
    nice -n 19 python benchmarks/moe.py quality --windows 200
    nice -n 19 python benchmarks/moe.py prepare --dir /tmp/moe-speed
    flock /work/bench.lock python benchmarks/moe.py speed --dir /tmp/moe-speed --tokens 32
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sparsepress as sp
from sparsepress.evaluate import interleaved_ms
from sparsepress.experts.adaptive import calibrate_routing, expert_counts, set_routing
from sparsepress.runtime import generate as native_generate
from sparsepress.runtime import native_blocks_of, native_blocks_reason
from sparsepress.sources import bundled_text, calibration_samples

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-moe"
DATA = Path("/work/shared/data/wikitext-2")
sys.path.insert(0, str(ROOT / "scripts"))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


# ---------------------------------------------------------------- quality


def eval_rows(tokenizer: Any, windows: int, holdout: bool) -> torch.Tensor:
    """Non-overlapping 128-token evaluation windows (bos first), as the fixture's training script makes them."""
    from train_tiny_llama import encode, windows as make_windows

    if holdout:
        text = (DATA / "valid.txt").read_text(encoding="utf-8")
        text = text[text.rfind("\n", 0, int(len(text) * 0.95)) + 1:]
    else:
        text = (DATA / "test.txt").read_text(encoding="utf-8")
    return make_windows(encode(tokenizer, text), 128, tokenizer.bos_token_id, windows)


@torch.no_grad()
def perplexity(model: torch.nn.Module, rows: torch.Tensor, batch: int = 25) -> float:
    total, count = 0.0, 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), chunk[:, 1:], reduction="sum"))
        count += chunk[:, 1:].numel()
    return math.exp(total / count)


def quality(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    dense = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    rows = eval_rows(tokenizer, args.windows, args.holdout)
    calibration = calibration_samples(tokenizer, bundled_text("calibration"), args.samples, 128, 0)
    where = "held-out validation tail" if args.holdout else "WikiText-2 test"
    print(f"tiny-moe on {len(rows)} x 128-token windows of {where}; calibration: {len(calibration)} samples; "
          f"{cpu_model()}")
    base = perplexity(dense, rows)
    results: dict[str, Any] = {"dense": base}
    print(f"\n| model | perplexity | rise |\n|---|---|---|\n| dense | {base:.2f} | |")

    def run(label: str, recipe: dict[str, Any]) -> torch.nn.Module:
        start = time.perf_counter()
        model = sp.compress(copy.deepcopy(dense), recipe, calibration=calibration, tokenizer=tokenizer)
        ppl = perplexity(model, rows)
        results[label] = ppl
        print(f"| {label} | {ppl:.2f} | {ppl / base - 1:+.2%} | ({time.perf_counter() - start:.0f} s)", flush=True)
        return model

    if "removal" in args.parts:
        for by in ("reap", "frequency", "gate_mass"):
            run(f"25% experts removed by {by}", {"stages": [{"experts": {"prune": 0.25, "by": by}}]})
        run("25% experts merged (reap)", {"stages": [{"experts": {"prune": 0.25, "by": "reap", "merge": True}}]})
        randoms = [run(f"25% experts removed at random, seed {seed}",
                       {"stages": [{"experts": {"prune": 0.25, "by": "random"}}], "seed": seed}) for seed in (0, 1, 2)]
        del randoms
        mean_random = statistics.mean(results[f"25% experts removed at random, seed {s}"] for s in (0, 1, 2))
        print(f"| 25% experts removed at random, mean of 3 seeds | {mean_random:.2f} | {mean_random / base - 1:+.2%} |")
        results["random mean"] = mean_random
        reap_rise, random_rise = results["25% experts removed by reap"] / base - 1, mean_random / base - 1
        print(f"\nreap rise {reap_rise:+.2%} (target <= 5%); random rise {random_rise:+.2%}; "
              f"reap / random = {reap_rise / random_rise:.2f} (target < 0.5)")
    if "routing" in args.parts:
        model = sp.compress(copy.deepcopy(dense), {"stages": [{"experts": {"top_p": "auto", "max_loss_rise": args.floor}}]},
                            calibration=calibration, tokenizer=tokenizer)
        record = model.sparsepress_record.extra["experts"]
        print(f"\nadaptive routing (quality floor: calibration loss +{args.floor:.0%}; chose top_p {record.top_p})\n")
        print("| top_p | experts / token (test) | fewer evaluations | perplexity | rise | calibration loss rise |")
        print("|---|---|---|---|---|---|")
        for point in record.points:
            set_routing(model, point.top_p)
            expert_counts(model, reset=True)
            ppl = perplexity(model, rows)
            per_token = expert_counts(model, reset=True).per_token
            results[f"top_p {point.top_p}"] = {"ppl": ppl, "experts_per_token": per_token}
            print(f"| {point.top_p:.2f} | {per_token:.3f} | {1 - per_token / 2:.1%} | {ppl:.2f} | {ppl / base - 1:+.2%} | "
                  f"{point.loss_rise:+.2%} |", flush=True)
    if "allocation" in args.parts:
        prune = {"prune": {"method": "sparsegpt", "sparsity": 0.5}}
        run("50% SparseGPT, uniform over experts", {"stages": [prune]})
        for temperature in args.temperatures:
            run(f"50% SparseGPT, usage allocation (T={temperature})",
                {"stages": [{"experts": {"allocation": "usage", "usage_temperature": temperature}}, prune]})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


# ---------------------------------------------------------------- speed


def moe_shaped(layers: int, seed: int = 0) -> torch.nn.Module:
    """A random Qwen3-MoE-shaped decoder: hidden 2048, 16 experts top-2 of intermediate 1408."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
                            num_experts=16, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=layers,
                            num_attention_heads=16, num_key_value_heads=4, head_dim=128, max_position_embeddings=512)
    return Qwen3MoeForCausalLM(config).eval()


def compressed(model: torch.nn.Module, sparsity: float | None) -> torch.nn.Module:
    stages: list[dict[str, Any]] = [{"quantize": {"method": "rtn", "bits": 8}}]
    if sparsity:
        stages.insert(0, {"prune": {"method": "magnitude", "sparsity": sparsity}})
    recipe = {"stages": stages, "format": "bitmask" if sparsity else "dense"}
    ids = [torch.randint(0, 4096, (16,), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return sp.compress(model, recipe, calibration=ids)


def decode_runner(model: torch.nn.Module, prompt: torch.Tensor, tokens: int):
    def run() -> None:
        with torch.inference_mode():
            model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    return run


def native_decode_runner(model: torch.nn.Module, prompt: torch.Tensor, tokens: int):
    def run() -> None:
        native_generate(model, prompt, max_new_tokens=tokens)
    return run


def prefill_runner(model: torch.nn.Module, ids: torch.Tensor, modules: bool = False):
    """model(ids) without a cache: the native Stack where installed, or (`modules`) the module path."""
    forward = native_blocks_of(model)

    def run() -> None:
        if forward is not None:
            forward.enabled = not modules
        try:
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)
        finally:
            if forward is not None:
                forward.enabled = True
    return run


def expert_bytes(model: torch.nn.Module) -> float:
    """Mean packed bytes of one expert (gate_up + down) as the kernels stream them."""
    from sparsepress.experts.adaptive import routed_experts
    from sparsepress.kernels import _plan_of

    sizes = [sum(t.numel() * t.element_size() for m in (e.gate_up_proj, e.down_proj) for t in _plan_of(m.packed).tensors)
             for layer in routed_experts(model) for e in layer]
    return statistics.mean(sizes)


def prepare(args: argparse.Namespace) -> None:
    """Build and compress the MoE-shaped models into `args.dir` (not timed: run it under nice)."""
    out = Path(args.dir)
    # built apart from the same seed (a copy of the fp32 model would double its 4.4 GB)
    sp.save(compressed(moe_shaped(args.layers), 0.5), out / "sparse-int8", overwrite=True)
    gc.collect()
    fp32 = moe_shaped(args.layers)
    fp32.save_pretrained(out / "fp32")
    sp.save(compressed(fp32, None), out / "dense-int8", overwrite=True)


def _fp32_runner(model: torch.nn.Module, implementation: str, prompt: torch.Tensor, tokens: int | None):
    def run() -> None:
        model.set_experts_implementation(implementation)
        (decode_runner(model, prompt, tokens) if tokens else prefill_runner(model, prompt))()
    return run


def speed(args: argparse.Namespace) -> None:
    """Time the prepared models side by side (run it under the bench lock, at normal priority)."""
    from transformers import AutoModelForCausalLM

    folder = Path(args.dir)
    prompt = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(1))
    prefill = torch.randint(0, 4096, (1, args.prefill), generator=torch.Generator().manual_seed(2))
    sparse = sp.load(folder / "sparse-int8")
    layers = sparse.config.num_hidden_layers
    print(f"MoE-shaped decoder ({layers} layers, hidden 2048, 16 experts top-2, intermediate 1408), random weights; "
          f"{cpu_model()}, {torch.get_num_threads()} threads; greedy decode of {args.tokens} tokens after 8")
    results: dict[str, Any] = {}

    def table(title: str, runs: dict[str, Any], per: int, tokens: int = 1) -> dict[str, float]:
        """ms per `per` calls' worth (per token for decode), tokens/s counting `tokens` per that ms."""
        ms = {name: value / per for name, value in interleaved_ms(runs, rounds=args.rounds, warmup=1).items()}
        print(f"\n### {title}\n\n| model | ms | tokens/s |" + "".join(f" vs {n} |" for n in ms) + "\n|---|---|---|"
              + "---|" * len(ms))
        for name, value in ms.items():
            print(f"| {name} | {value:.2f} | {tokens * 1000 / value:.1f} |"
                  + "".join(f" {ms[n] / value:.2f}x |" for n in ms), flush=True)
        return ms

    sparse_name = "sparsepress 50% + int8 (bitmask)"
    native, modules = " native decode", " module path"
    for name, model in (("sparse-int8", sparse),):
        if native_blocks_of(model) is None:
            print(f"{name}: no native blocks ({native_blocks_reason(model)})")
    fp32 = AutoModelForCausalLM.from_pretrained(folder / "fp32", dtype=torch.float32).eval()
    results["decode fp32"] = table("decode, ms per token: transformers fp32 vs sparsepress", {
        "transformers fp32 (grouped_mm, its default)": _fp32_runner(fp32, "grouped_mm", prompt, args.tokens),
        "transformers fp32 (eager)": _fp32_runner(fp32, "eager", prompt, args.tokens),
        sparse_name + modules: decode_runner(sparse, prompt, args.tokens),
        sparse_name + native: native_decode_runner(sparse, prompt, args.tokens)}, args.tokens)
    results["prefill fp32"] = table(f"prefill of {args.prefill} tokens, ms", {
        "transformers fp32 (grouped_mm, its default)": _fp32_runner(fp32, "grouped_mm", prefill, None),
        "transformers fp32 (eager)": _fp32_runner(fp32, "eager", prefill, None),
        sparse_name + modules: prefill_runner(sparse, prefill, modules=True),
        sparse_name + " native Stack": prefill_runner(sparse, prefill)}, 1, args.prefill)
    del fp32
    gc.collect()
    dense_int8 = sp.load(folder / "dense-int8")
    if native_blocks_of(dense_int8) is None:
        print(f"dense-int8: no native blocks ({native_blocks_reason(dense_int8)})")
    dense_name = "sparsepress dense int8"
    results["decode int8"] = table("decode, ms per token: sparsepress dense int8 vs 50% + int8", {
        dense_name + modules: decode_runner(dense_int8, prompt, args.tokens),
        sparse_name + modules: decode_runner(sparse, prompt, args.tokens),
        dense_name + native: native_decode_runner(dense_int8, prompt, args.tokens),
        sparse_name + native: native_decode_runner(sparse, prompt, args.tokens)}, args.tokens)
    results["prefill int8"] = table(f"prefill of {args.prefill} tokens, ms", {
        dense_name + modules: prefill_runner(dense_int8, prefill, modules=True),
        sparse_name + modules: prefill_runner(sparse, prefill, modules=True),
        dense_name + " native Stack": prefill_runner(dense_int8, prefill),
        sparse_name + " native Stack": prefill_runner(sparse, prefill)}, 1, args.prefill)
    # bytes read per token: what the grouped kernel counted against top-k experts' packed bytes
    print("\n### packed expert bytes read per decoded token and MoE layer (counted by the grouped kernel)\n")
    print("| model | counted | 2 selected experts | all 16 experts |\n|---|---|---|---|")
    for name, model in ((dense_name, dense_int8), (sparse_name, sparse)):
        expert_counts(model, reset=True)
        prefill_runner(model, prompt)()  # what generate's first step (the prompt) reads
        prompt_counts = expert_counts(model, reset=True)
        native_decode_runner(model, prompt, args.tokens)()
        counts = expert_counts(model, reset=True)
        per_expert = expert_bytes(model)
        # decode steps only: generate's prompt step taken out; tokens counted once per MoE layer
        counted = (counts.bytes_read - prompt_counts.bytes_read) / (counts.tokens - prompt_counts.tokens)
        results[f"bytes {name}"] = {"counted": counted, "two_experts": 2 * per_expert}
        print(f"| {name} | {counted / 1e6:.3f} MB | {2 * per_expert / 1e6:.3f} MB | {16 * per_expert / 1e6:.2f} MB |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality")
    q.add_argument("--windows", type=int, default=200)
    q.add_argument("--samples", type=int, default=128)
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--holdout", action="store_true", help="measure on the fixture's held-out validation tail")
    q.add_argument("--floor", type=float, default=0.02, help="adaptive routing: calibration loss rise allowed")
    q.add_argument("--temperatures", type=float, nargs="+", default=[0.05])
    q.add_argument("--parts", nargs="+", default=["removal", "routing", "allocation"])
    q.add_argument("--json")
    p = sub.add_parser("prepare", help="build and compress the MoE-shaped models (run under nice)")
    p.add_argument("--dir", default="bench-out/moe-speed")
    p.add_argument("--layers", type=int, default=8)
    s = sub.add_parser("speed", help="time the prepared models (run under the bench lock)")
    s.add_argument("--dir", default="bench-out/moe-speed")
    s.add_argument("--tokens", type=int, default=32)
    s.add_argument("--prefill", type=int, default=128)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--json")
    args = parser.parse_args()
    {"quality": quality, "prepare": prepare, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
