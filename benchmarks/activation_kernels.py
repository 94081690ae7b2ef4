"""Activation sparsity in the native kernels: LLaMA-7B-shaped int8 layers at batch 1 with and without
zeroed inputs (column skipping, csrc/colskip.h), per ISA tree, and the crossover densities.

Each layer shape is timed as a stack of distinct copies bigger than the L3 (weights come from DRAM, as
in decode). Ratios are measured side by side in this process: rounds alternate the paths.

Example:
    python benchmarks/activation_kernels.py --quick
    python benchmarks/activation_kernels.py --crossover   # densities up to which skipping pays
    python benchmarks/activation_kernels.py --crossover --shape 256 2048 --formats dense --trees avx512 --tokens 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from sparsepress import native
from sparsepress.formats import BitmaskWeight, DenseWeight
from sparsepress.kernels import native_handle, packed_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import cpu_model  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out, in): q/k/v/o, gate/up, down
L3_BYTES = 32 << 20


def make_stack(out: int, inn: int, fmt: str, seed: int) -> list:
    """Distinct int8 weights of one shape, together at least twice the L3."""
    gen = torch.Generator().manual_seed(seed)
    per = out * inn * (1.0 if fmt == "dense" else 0.625)
    count = max(2, int(2 * L3_BYTES // per) + 1)
    stack = []
    for _ in range(count):
        w = torch.randn(out, inn, generator=gen)
        if fmt == "bitmask":
            w[torch.rand(out, inn, generator=gen) < 0.5] = 0
            stack.append(BitmaskWeight.pack(w, dtype="int8"))
        else:
            stack.append(DenseWeight.pack(w, dtype="int8"))
    return stack


def threshold_for(x: torch.Tensor, sparsity: float) -> float:
    """The magnitude below which a fraction `sparsity` of x's entries fall."""
    return float(x.abs().flatten().kthvalue(max(1, int(sparsity * x.numel()))).values) if sparsity > 0 else 0.0


def time_paths(stack: list, x: torch.Tensor, paths: dict[str, float], rounds: int, calls: int) -> dict[str, float]:
    """Median microseconds per layer call of each path (name -> threshold), rounds alternating."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    for name, t in paths.items():  # warm-up: column chunks, caches
        for p in stack:
            packed_linear(x, p, threshold=t)
    for _ in range(rounds):
        for name, t in paths.items():
            start = time.perf_counter()
            for i in range(calls):
                packed_linear(x, stack[i % len(stack)], threshold=t)
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


def layer_tables(args: argparse.Namespace) -> None:
    lib = native.module()
    trees = [t for t in ("avx512", "avx2") if t in lib.supported_isas()] or lib.supported_isas()[-1:]
    print(f"\nCPU: {cpu_model()}; threads {torch.get_num_threads()}; trees {', '.join(trees)}; batch 1\n")
    print("| tree | weights | layer (out x in) | act. sparsity 0 (us) | act. sparsity 0.5 (us) | speedup | "
          "column chunks / packed weight |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for fmt in ("dense", "bitmask"):
        for out, inn in SHAPES[: 1 if args.quick else None]:
            stack = make_stack(out, inn, fmt, seed=out + inn)
            x = torch.randn(1, inn, generator=torch.Generator().manual_seed(1))
            t50 = threshold_for(x, 0.5)
            for tree in trees:
                lib.set_isa(tree)
                for p in stack:  # chunks are per tree-independent layout, built once
                    native_handle(p).prepare_colpanels(torch.get_num_threads())
                us = time_paths(stack, x, {"0": 0.0, "0.5": t50}, args.rounds, args.calls)
                h = native_handle(stack[0])
                packed = stack[0].nbytes
                label = "dense int8" if fmt == "dense" else "bitmask 50% int8"
                print(f"| {tree} | {label} | {out} x {inn} | {us['0']:.0f} | {us['0.5']:.0f} | "
                      f"{us['0'] / us['0.5']:.2f}x | {h.colpanel_bytes / packed:.2f}x |")
                sys.stdout.flush()
            del stack


def crossover(args: argparse.Namespace) -> None:
    """Per tree and token count: listed-column densities where skipping (policy 2) beats the row
    kernels on the same zeroed inputs (policy 1). Tokens share the listed columns."""
    lib = native.module()
    out, inn = args.shape
    print(f"\nCPU: {cpu_model()}; layer {out} x {inn} int8; ratio = row kernels / column skipping\n")
    densities = [0.3, 0.5, 0.6, 0.7, 0.85, 0.95]
    for fmt in args.formats:
        stack = make_stack(out, inn, fmt, seed=7)
        for tree in [t for t in args.trees if t in lib.supported_isas()]:
            lib.set_isa(tree)
            print(f"\n{fmt} int8, {tree}\n\n| tokens | " + " | ".join(f"d={d}" for d in densities) + " |")
            print("| ---: |" + " ---: |" * len(densities))
            for batch in args.tokens:
                cells = []
                for d in densities:
                    gen = torch.Generator().manual_seed(batch)
                    keep = torch.rand(inn, generator=gen) < d
                    x = torch.randn(batch, inn, generator=gen).sign() * (1 + torch.rand(batch, inn, generator=gen))
                    x[:, ~keep] = 0.01
                    us = {}
                    for policy in (1, 2):
                        lib.set_colskip_policy(policy)
                        us[policy] = time_paths(stack[:2] if tree == "scalar" else stack, x, {"t": 0.5},
                                                args.rounds, max(4, args.calls // (8 if tree == "scalar" else 1)))["t"]
                    cells.append(f"{us[1] / us[2]:.2f}")
                lib.set_colskip_policy(0)
                print(f"| {batch} | " + " | ".join(cells) + " |")
                sys.stdout.flush()
        del stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape only")
    parser.add_argument("--crossover", action="store_true", help="measure the crossover densities instead")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 4096], metavar=("OUT", "IN"),
                        help="--crossover: the layer shape")
    parser.add_argument("--formats", nargs="+", default=["dense", "bitmask"], help="--crossover: weight formats")
    parser.add_argument("--trees", nargs="+", default=["avx512", "avx2", "scalar"], help="--crossover: ISA trees")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8], help="--crossover: token counts")
    args = parser.parse_args()
    if not native.native_available():
        raise SystemExit("the native extension is not built")
    torch.set_num_threads(int(os.environ.get("SPARSEPRESS_BENCH_THREADS", torch.get_num_threads())))
    crossover(args) if args.crossover else layer_tables(args)


if __name__ == "__main__":
    main()
