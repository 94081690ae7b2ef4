"""Memory and time of one-shot compression at ~1B parameters: peak RSS against the fp32 model size.

A LLaMA-shaped model with random weights (default hidden 2048, 16 layers, intermediate 5504, vocab
32000: ~0.94B parameters, 3.8 GB in float32) is written tensor by tensor as float32 safetensors shards
(the parent never holds the model), then a child process loads it with sparsepress's loader,
compresses it (SparseGPT 50% by default, random-id calibration) and saves it. The child reports its
stages; the parent reads the child's peak RSS from getrusage(RUSAGE_CHILDREN). Target: < 1.5x fp32.

Example:
    PYTHONPATH=src python benchmarks/scale.py                    # the full ~1B model
    PYTHONPATH=src python benchmarks/scale.py --layers 4         # same width, 4 blocks
    PYTHONPATH=src python benchmarks/scale.py --layers 1 --no-save
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GIB = 1024**3
SOLVERS = {
    "default": {},
    "plain": {"sequential": False, "dense_target": 0.0, "refit": False, "bias_correction": False,
              "mask_search": 0},
}


def _rss_peak_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # Linux reports KiB


def _rss_now_gib() -> dict[str, float]:
    """Current anonymous and file-backed (mmap'd weights) resident memory, from /proc (Linux)."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if line.startswith(("RssAnon", "RssFile")))
    return {k.lower(): round(int(v.split()[0]) / 1024**2, 3) for k, v in fields.items()}


def write_random_llama(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                       kv_heads: int, shard_bytes: int = 1 << 30, seed: int = 0) -> int:
    """Write a random-weight LlamaForCausalLM folder (config + float32 shards + index); returns fp32 bytes.

    Shapes come from a meta-device model, so no full model is ever materialised here.

    Example:
        >>> import tempfile
        >>> write_random_llama(Path(tempfile.mkdtemp()), 32, 1, 64, 100, 2, 1) > 0
        True
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=2048,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    groups: list[list[str]] = [[]]
    filled = 0
    for name, shape in shapes.items():
        nbytes = 4 * int(torch.Size(shape).numel())
        if groups[-1] and filled + nbytes > shard_bytes:
            groups.append([])
            filled = 0
        groups[-1].append(name)
        filled += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for number, names in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: torch.ones(shapes[n]) if n.endswith("norm.weight") else torch.randn(shapes[n], generator=gen).mul_(0.02)
                 for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 4 for t in shard.values())
        weight_map.update({n: file for n in names})
        del shard
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def child(args: argparse.Namespace) -> None:
    """Load, compress and save in this process, printing one JSON line per stage."""
    import sparsepress as sp
    from sparsepress.sources import load_source

    def report(stage: str, **extra: object) -> None:
        print(json.dumps({"stage": stage, "seconds": round(time.perf_counter() - start, 1),
                          "rss_peak_gib": round(_rss_peak_bytes() / GIB, 3), **_rss_now_gib(), **extra}), flush=True)

    start = time.perf_counter()
    source = load_source(args.folder)
    report("loaded")
    model = source.model
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, vocab, (args.seq_len,), generator=gen) for _ in range(args.samples)]
    recipe = {"stages": [{"prune": {"method": args.method, "sparsity": args.sparsity}}], "format": "bitmask"}
    recipe["solver"] = SOLVERS[args.solver]
    if args.int8:
        recipe["stages"].append({"quantize": {"method": "gptq" if args.method == "sparsegpt" else "rtn", "bits": 8}})
    block_times: list[float] = []
    last = [time.perf_counter()]

    def progress(what: str, done: int, total: int) -> None:
        if what == "compressing blocks":
            now = time.perf_counter()
            block_times.append(now - last[0])
            last[0] = now
            report("block", index=done, of=total, block_seconds=round(block_times[-1], 1))

    last[0] = time.perf_counter()
    model = sp.compress(model, recipe, calibration=ids, samples=args.samples, seq_len=args.seq_len,
                        batch_size=args.batch_size, progress=progress)
    report("compressed", mean_block_seconds=round(sum(block_times) / max(1, len(block_times)), 1))
    if args.save:
        out = Path(args.folder).parent / "compressed"
        sp.save(model, out, overwrite=True)
        report("saved", bytes=(out / "sparsepress.safetensors").stat().st_size)


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak RSS and wall time of compressing a ~1B LLaMA-shaped model.")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--method", default="sparsegpt", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--int8", action="store_true", help="also quantize (GPTQ for sparsegpt, else RTN) to int8")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--solver", default="default", choices=sorted(SOLVERS),
                        help="default: the recipe's solver defaults; plain: one-pass SparseGPT / GPTQ (all refinements off)")
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the model (default: a temp dir)")
    parser.add_argument("--child", dest="folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.folder is not None:
        child(args)
        return

    workdir = Path(tempfile.mkdtemp(prefix="sparsepress-scale-", dir=args.workdir))
    try:
        folder = workdir / "model"
        folder.mkdir()
        start = time.perf_counter()
        fp32 = write_random_llama(folder, args.hidden, args.layers, args.intermediate, args.vocab, args.heads, args.kv_heads)
        print(f"model: {fp32 / 4 / 1e9:.3f}B parameters, {fp32 / GIB:.2f} GiB fp32, written in "
              f"{time.perf_counter() - start:.0f}s to {folder}", flush=True)
        command = [sys.executable, __file__, "--child", str(folder), "--method", args.method, "--sparsity",
                   str(args.sparsity), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--solver", args.solver]
        command += (["--int8"] if args.int8 else []) + ([] if args.save else ["--no-save"])
        start = time.perf_counter()
        done = subprocess.run(command, env=os.environ.copy(), check=False)
        wall = time.perf_counter() - start
        peak = _rss_peak_bytes(resource.RUSAGE_CHILDREN)
        status = "ok" if done.returncode == 0 else f"child failed ({done.returncode})"
        print(f"\n| layers | params | fp32 GiB | wall s | peak RSS GiB | RSS / fp32 | status |\n|---|---|---|---|---|---|---|\n"
              f"| {args.layers} | {fp32 / 4 / 1e9:.3f}B | {fp32 / GIB:.2f} | {wall:.0f} | {peak / GIB:.2f} | "
              f"{peak / fp32:.2f} | {status} |")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
