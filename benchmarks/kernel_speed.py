"""Batch-1 / batch-16 latency of the native packed kernels against torch, on LLaMA-7B layer shapes.

Each measurement runs a stack of distinct layers whose weights together exceed the last-level cache,
so weights stream from DRAM as they do in a real model. Prints the CPU model, its ISA levels and a
markdown table per kernel tree: ms per layer, speedup over torch fp32 (F.linear), over torch dynamic
int8 (quantize_dynamic, fbgemm), over torch.sparse CSR (fp32), and packed bytes per weight (plus those
of prepared GEMM panels, where a layer has them: with the default panel policy, big layers get them
from their first many-token call).

Every SIMD tree this CPU runs is measured, each in a process of its own with SPARSEPRESS_ISA set. A
tree below the CPU's best (AVX2 on an AVX-512 machine) is measured against fbgemm held to the same
level (FBGEMM_ENABLE_INSTRUCTIONS=AVX2, ATEN_CPU_CAPABILITY=avx2): the ratios are indicative of an
AVX2-only CPU, not measured on one (the cores, caches and memory are still this machine's).
`--elastic` adds one nested elastic weight (levels 0.5 / 0.7 / 0.9 in one packed form, formats/elastic.py)
run at each of its levels: its speed should follow the level, and each level's row shows its ratio to the
single-level bitmask weight of the same sparsity (bytes/weight: what the elastic weight holds in memory).

Usage:
    python benchmarks/kernel_speed.py               # every tree, full run (~3 minutes per tree on 2 cores)
    python benchmarks/kernel_speed.py --quick       # first shape only, fewer repeats
    python benchmarks/kernel_speed.py --isa avx2    # one tree (in this process)
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from sparsepress import kernels, native
from sparsepress.evaluate import interleaved_ms
from sparsepress.formats import BBSWeight, BitmaskWeight, ElasticWeight, NMWeight, PackedWeight

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
CONFIGS = [  # label, format, sparsity
    ("bitmask int8 50%", "bitmask", 0.5),
    ("bitmask int8 75%", "bitmask", 0.75),
    ("bitmask int8 90%", "bitmask", 0.9),
    ("2:4 int8", "nm", 0.5),
    ("bbs int8 50%", "bbs", 0.5),
]


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def isa_summary() -> str:
    """The vector extensions of this CPU that the kernel trees use, as /proc/cpuinfo names them."""
    wanted = ["avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vbmi", "avx512_vbmi2", "avx_vnni", "asimd",
              "asimddp"]
    flags = cpu_flags()
    return " ".join(f for f in wanted if f in flags) or "none of avx2 / avx512 / neon"


# fbgemm and ATen held to a tree's level when it is below the CPU's best
AVX2_BASELINE = {"FBGEMM_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
BASELINE_LEVEL = {"avx2": AVX2_BASELINE, "avx2vnni": AVX2_BASELINE}


def llc_bytes() -> int:
    best = 32 << 20
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
            best = max(best, int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]])
        except (OSError, ValueError, KeyError):
            continue
    return best


def layers_needed(bytes_per_layer: float, llc: int) -> int:
    return max(2, math.ceil(2 * llc / bytes_per_layer))


def sparse_weight(fmt: str, shape: tuple[int, int], sparsity: float, gen: torch.Generator) -> torch.Tensor:
    out_features, in_features = shape
    w = torch.randn(out_features, in_features, generator=gen) * 0.02
    if fmt == "bitmask":
        return w * (torch.rand(shape, generator=gen) >= sparsity)
    group = 4 if fmt == "nm" else 64
    kept = round(group * (1 - sparsity))
    scores = torch.rand(out_features, in_features // group, group, generator=gen)
    keep = torch.zeros_like(scores).scatter_(2, scores.argsort(dim=2)[..., :kept], 1.0)
    return w * keep.view(shape)


def pack(fmt: str, w: torch.Tensor) -> PackedWeight:
    if fmt == "bitmask":
        return BitmaskWeight.pack(w, dtype="int8")
    if fmt == "nm":
        return NMWeight.pack(w, dtype="int8", n=2, m=4)
    return BBSWeight.pack(w, dtype="int8", bank=64)


def copies(packed: PackedWeight, count: int) -> list[PackedWeight]:
    """Distinct-memory copies of one packed weight (same pattern; what matters is the bytes streamed)."""
    out = [packed]
    for _ in range(count - 1):
        fields = {name: t.clone() for name, t in packed.tensors().items() if name != "scales"}
        params = {p: getattr(packed, p) for p in packed.params}
        out.append(type(packed)(shape=packed.shape, dtype=packed.dtype, scales=packed.scales.clone(),
                                group_size=packed.group_size, **params, **fields))
    return out


ELASTIC_LEVELS = [0.5, 0.7, 0.9]


def elastic_stack(shape: tuple[int, int], gen: torch.Generator, llc: int) -> list[ElasticWeight]:
    """Distinct elastic weights (levels 0.5 / 0.7 / 0.9, random nesting) filling twice the last-level cache."""
    w = torch.randn(shape, generator=gen) * 0.02
    score = torch.rand(shape, generator=gen)
    keeps = [score >= level for level in ELASTIC_LEVELS]
    first = ElasticWeight.pack(w * keeps[0], dtype="int8", keeps=keeps, levels=ELASTIC_LEVELS)
    return [first] + [ElasticWeight.pack(w * keeps[0], dtype="int8", keeps=keeps, levels=ELASTIC_LEVELS)
                      for _ in range(layers_needed(first.resident_nbytes, llc) - 1)]


def stack_runner(step, n_layers: int):
    """A callable running `step(i)` over the whole stack; its time / n_layers is ms per layer."""
    def run() -> None:
        for i in range(n_layers):
            step(i)
    return run


def time_stack(step, n_layers: int, reps: int) -> float:
    """Median ms per layer of running `step(i)` over the stack, after one warm pass."""
    return interleaved_ms({"stack": stack_runner(step, n_layers)}, rounds=reps, warmup=1)["stack"] / n_layers


def torch_runners(shape, x: torch.Tensor, llc: int, gen: torch.Generator) -> dict[str, tuple]:
    """(runner, layers) of torch fp32 (F.linear) and torch dynamic int8 (fbgemm) stacks of `shape`."""
    out_features, in_features = shape
    n_fp32 = layers_needed(4 * out_features * in_features, llc)
    weights = [torch.randn(out_features, in_features, generator=gen) * 0.02 for _ in range(n_fp32)]
    n_int8 = layers_needed(out_features * in_features, llc)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = []
        for i in range(n_int8):
            lin = torch.nn.Linear(in_features, out_features, bias=False)
            lin.weight.data = weights[i % n_fp32]
            quantized.append(torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear},
                                                                    dtype=torch.qint8))
    return {"torch fp32": (stack_runner(lambda i: F.linear(x, weights[i]), n_fp32), n_fp32),
            "torch dyn int8": (stack_runner(lambda i: quantized[i](x), n_int8), n_int8)}


def csr_baseline(w: torch.Tensor, x: torch.Tensor, reps: int, llc: int) -> float:
    warnings.filterwarnings("ignore", message="Sparse")  # torch's beta notices about CSR tensors
    csr = w.to_sparse_csr()
    nbytes = csr.values().numel() * 12
    stack = [csr] + [torch.sparse_csr_tensor(csr.crow_indices().clone(), csr.col_indices().clone(),
                                             csr.values().clone(), csr.shape)
                     for _ in range(layers_needed(nbytes, llc) - 1)]
    xt = x.T.contiguous()
    return time_stack(lambda i: torch.sparse.mm(stack[i], xt), len(stack), max(3, reps // 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-csr", action="store_true", help="skip the (slow) torch.sparse CSR baseline")
    parser.add_argument("--elastic", action="store_true", help="add a nested elastic weight run at each level")
    parser.add_argument("--panels", choices=list(kernels.PANEL_POLICIES), default=kernels.PANELS,
                        help="which layers get prepared GEMM panels (SPARSEPRESS_PANELS; default auto)")
    parser.add_argument("--isa", choices=native.ISA_LEVELS, default=None,
                        help="measure this tree only, in this process (default: every SIMD tree of this CPU)")
    args = parser.parse_args()
    if args.isa is None:
        run_every_tree(sys.argv[1:])
        return
    native.set_isa(args.isa)
    kernels.PANELS = args.panels
    reps = args.reps or (3 if args.quick else 7)
    shapes = SHAPES[:1] if args.quick else SHAPES
    llc = llc_bytes()
    gen = torch.Generator().manual_seed(0)
    held = {k: v for k, v in os.environ.items() if k in ("FBGEMM_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY")}
    print(f"CPU: {cpu_model()} ({isa_summary()}); torch threads: {torch.get_num_threads()}; "
          f"sparsepress tree: {native.active_isa()} (best here: {native.supported_isas()[-1]}); "
          f"fbgemm level: {held or 'its own best'}; last-level cache {llc >> 20} MiB; GEMM panels: {args.panels}")
    if held:
        print("(a tree below this CPU's best against fbgemm held to the same level: indicative timings, "
              "not an AVX2-only CPU)")
    print()
    print("| shape (out x in) | batch | weights | ms | vs torch fp32 | vs torch dyn int8 | vs torch CSR | bytes/weight |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with torch.inference_mode():
        for shape in shapes:
            packs = {}
            elastic = elastic_stack(shape, gen, llc) if args.elastic else []
            extra = [("bitmask int8 70%", "bitmask", 0.7)] if args.elastic else []
            for label, fmt, sparsity in CONFIGS + extra:
                w = sparse_weight(fmt, shape, sparsity, gen)
                packed = pack(fmt, w)
                packs[label] = (w, packed, copies(packed, layers_needed(packed.nbytes, llc)))
            for batch in args.batches:
                x = torch.randn(batch, shape[1], generator=gen)
                runners = torch_runners(shape, x, llc, gen)
                for label, (_, _, stack) in packs.items():
                    runners[label] = (stack_runner(lambda i, s=stack, x=x: kernels.packed_linear(x, s[i], None),
                                                   len(stack)), len(stack))
                for index, level in enumerate(ELASTIC_LEVELS if elastic else []):
                    runners[f"elastic level {level:g}"] = (stack_runner(
                        lambda i, x=x, j=index: kernels.elastic_linear(x, elastic[i], j), len(elastic)), len(elastic))
                # every runtime timed round-robin, so a slow phase of the machine hits all alike
                total = interleaved_ms({k: run for k, (run, _) in runners.items()}, rounds=reps, warmup=1)
                ms = {k: total[k] / layers for k, (_, layers) in runners.items()}
                fp32_ms, int8_ms = ms["torch fp32"], ms["torch dyn int8"]
                for label, (w, packed, _) in packs.items():
                    csr = "-" if args.no_csr else f"{csr_baseline(w, x, reps, llc) / ms[label]:.2f}x"
                    weights = shape[0] * shape[1]
                    bpw = f"{packed.nbytes / weights:.3f}"
                    handle = kernels._plan_of(packed).handle
                    if handle.panel_bytes:  # prepared GEMM panels live beside the packed weight
                        bpw += f" (+{handle.panel_bytes / weights:.3f} panels)"
                    if getattr(handle, "gather_bytes", 0):  # and gather rows (very sparse, few tokens)
                        bpw += f" (+{handle.gather_bytes / weights:.3f} gather)"
                    print(f"| {shape[0]}x{shape[1]} | {batch} | {label} | {ms[label]:.3f} | {fp32_ms / ms[label]:.2f}x "
                          f"| {int8_ms / ms[label]:.2f}x | {csr} | {bpw} |", flush=True)
                for level in ELASTIC_LEVELS if elastic else []:
                    label = f"elastic level {level:g}"
                    single = ms.get(f"bitmask int8 {round(level * 100)}%")
                    vs_single = f"; {single / ms[label]:.2f}x the single-level {level:.0%}" if single else ""
                    bpw = f"{elastic[0].resident_nbytes / (shape[0] * shape[1]):.3f} (all levels)"
                    print(f"| {shape[0]}x{shape[1]} | {batch} | {label} | {ms[label]:.3f} | {fp32_ms / ms[label]:.2f}x "
                          f"| {int8_ms / ms[label]:.2f}x | level 0.5 / this: {ms['elastic level 0.5'] / ms[label]:.2f}x"
                          f"{vs_single} | {bpw} |", flush=True)
                print(f"| {shape[0]}x{shape[1]} | {batch} | torch fp32 / dyn int8 | {fp32_ms:.3f} / {int8_ms:.3f} "
                      f"| | | | 4.0 / 1.0 |", flush=True)
                del runners


def run_every_tree(argv: list[str]) -> None:
    """This script once per SIMD tree of this CPU, each in its own process (fbgemm reads its level once)."""
    best = native.supported_isas()[-1] if native.supported_isas() else "none"
    trees = [isa for isa in native.supported_isas() if isa != "scalar"] or ["scalar"]
    for isa in reversed(trees):
        env = dict(os.environ, SPARSEPRESS_ISA=isa, **(BASELINE_LEVEL.get(isa, {}) if isa != best else {}))
        print(f"## tree {isa}", flush=True)
        subprocess.run([sys.executable, __file__, *argv, "--isa", isa], env=env, check=True)
        print(flush=True)


if __name__ == "__main__":
    main()
