"""Compressing a model larger than memory: a LLaMA-7B-shaped model with random bf16 weights, streamed.

The model (default hidden 4096, intermediate 11008, 32 layers, 32 heads, vocab 32000: 6.74B parameters,
13.5 GB in bf16) is written one shard per block (the embeddings and the head in shards of their own), so
writing it never holds more than one block. A child process then compresses it with
`load_source(..., stream=True)` + `sp.compress(..., weights=...)` and saves the packed folder; it reports
each block's time and its resident memory (psutil, sampled every 50 ms in a thread) and, at the end, its
peak RSS (VmHWM, reset when the child starts), which the parent's table shows. Target: peak RSS <= 6 GiB on a 24 GiB machine.
Finished blocks are spilled to disk as they are solved (`sparsepress.spill`); `--no-spill` keeps them in
memory until the save, as before, for comparison.

Example:
    PYTHONPATH=src python benchmarks/stream.py --workdir /scratch --layers 4        # check: 4 blocks of 7B shape
    PYTHONPATH=src python benchmarks/stream.py --workdir /scratch                   # the whole 7B shape
    PYTHONPATH=src python benchmarks/stream.py --workdir /scratch --layers 1 --method sparsegpt --solver default
    PYTHONPATH=src python benchmarks/stream.py --model /scratch/model-32 --keep     # reuse a written model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch

GIB = 1024**3
SOLVERS = {
    "default": {},
    "plain": {"sequential": False, "dense_target": 0.0, "refit": False, "bias_correction": False, "mask_search": 0},
}


def write_random_llama_bf16(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int, heads: int,
                            kv_heads: int, seed: int = 0, progress: bool = True) -> int:
    """Write a random-weight LlamaForCausalLM folder in bf16, one shard per block; returns the bf16 bytes.

    Shapes come from a meta-device model; one block's tensors are in memory at a time. `progress` prints a
    line per shard written.

    Example:
        >>> import tempfile
        >>> write_random_llama_bf16(Path(tempfile.mkdtemp()), 32, 2, 64, 100, 4, 2, progress=False) > 0
        True
    """
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"], dtype="bfloat16")
    config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(config).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        group = f"layer{int(parts[2]):03d}" if parts[1] == "layers" else ("embed" if "embed" in name else "head")
        groups.setdefault(group, []).append(name)
    gen = torch.Generator().manual_seed(seed)
    # Drawing 6.7B normal values took ~4 min per billion on two busy cores: each tensor is instead a
    # 16M-value random pool read from a random offset (values repeat every 16M; magnitude and RTN don't mind).
    pool = torch.randn(1 << 24, generator=gen).mul_(0.02).to(torch.bfloat16)
    weight_map, total = {}, 0
    for number, (group, names) in enumerate(groups.items(), start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        shard = {}
        for name in names:
            if name.endswith("norm.weight"):
                shard[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                shard[name] = _from_pool(pool, shapes[name], gen)
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in shard.values())
        weight_map.update({n: file for n in names})
        del shard
        if progress:
            print(f"  wrote {group} ({number}/{len(groups)})", flush=True)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    return total


def _from_pool(pool: torch.Tensor, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A tensor of `shape` filled with `pool`'s values from a random offset on, wrapping around."""
    numel = int(torch.Size(shape).numel())
    start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
    rolled = torch.cat([pool[start:], pool[:start]])
    return rolled.repeat(-(-numel // pool.numel()))[:numel].reshape(shape).clone()


class RssSampler:
    """The largest resident set of this process seen by a 50 ms sampling thread (psutil), and the time series.

    Example:
        >>> with RssSampler() as sampler: pass
        >>> sampler.peak > 0
        True
    """

    def __init__(self, every: float = 0.05):
        import psutil

        self.process, self.every = psutil.Process(), every
        self.peak, self.samples = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.perf_counter()
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peak = max(self.peak, rss)
            self.samples.append((round(time.perf_counter() - start, 2), rss))
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def reset_high_water_mark() -> None:
    """Start this process's peak RSS (VmHWM) again from its current RSS, where Linux allows it.

    A child's getrusage peak starts at the RSS of the process that forked it (Linux carries it across
    exec): after the parent wrote a large model that would count, so the child measures its own VmHWM.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def high_water_mark() -> int:
    """This process's peak RSS in bytes since its start or the last reset (VmHWM; getrusage elsewhere).

    Example:
        >>> high_water_mark() > 0
        True
    """
    try:
        with open("/proc/self/status") as handle:
            return next(int(line.split()[1]) for line in handle if line.startswith("VmHWM")) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args: argparse.Namespace) -> None:
    """Stream-compress and save in this process, printing one JSON line per stage."""
    import sparsepress as sp
    from sparsepress.sources import load_source
    from sparsepress.spill import BlockSpill

    def report(stage: str, **extra: object) -> None:
        print(json.dumps({"stage": stage, "seconds": round(time.perf_counter() - start, 1),
                          "rss_now_gib": round(sampler.process.memory_info().rss / GIB, 3),
                          "rss_peak_gib": round(sampler.peak / GIB, 3), **extra}), flush=True)

    reset_high_water_mark()
    with RssSampler() as sampler:
        start = time.perf_counter()
        source = load_source(args.folder, stream=True)
        report("skeleton")
        vocab = source.model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        ids = [torch.randint(0, vocab, (args.seq_len,), generator=gen) for _ in range(args.samples)]
        recipe = {"stages": [{"prune": {"method": args.method, "sparsity": args.sparsity}},
                             {"quantize": {"method": "gptq" if args.method == "sparsegpt" else "rtn", "bits": 8}}],
                  "format": "bitmask", "solver": {**SOLVERS[args.solver],
                                                  **({"mask_search": args.mask_search} if args.mask_search is not None else {})}}
        if args.cg_steps is not None:
            from sparsepress.prune import refit

            refit.CG_ITERATIONS = args.cg_steps  # a benchmark's shortcut for memory-only readings
        last = [time.perf_counter()]

        def progress(what: str, done: int, total: int) -> None:
            now = time.perf_counter()
            report("block", index=done, of=total, block_seconds=round(now - last[0], 1))
            last[0] = now

        out = Path(args.out)
        with BlockSpill.beside(out) if args.spill else nullcontext() as spill:
            model = sp.compress(source.model, recipe, calibration=ids, samples=args.samples, seq_len=args.seq_len,
                                batch_size=args.batch_size, progress=progress, weights=source.weights, spill=spill)
            report("compressed")
            if args.save:
                sp.save(model, out, overwrite=True)
                report("saved", bytes=(out / "sparsepress.safetensors").stat().st_size)
    report("done", recipe=recipe, spill=args.spill, peak_gib=round(high_water_mark() / GIB, 3))


def cpu_model() -> str:
    """The CPU's model name (lscpu), or the platform's processor string."""
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description="Wall time and peak RSS of streaming a LLaMA-7B-shaped model.")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--method", default="magnitude", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--solver", default="default", choices=sorted(SOLVERS))
    parser.add_argument("--mask-search", type=int, default=None,
                        help="ADMM steps (default: the solver's); with --cg-steps a short memory-only reading: "
                             "every step reuses the same buffers, so the peak does not depend on their count")
    parser.add_argument("--cg-steps", type=int, default=None, help="refit iterations (default: the library's)")
    parser.add_argument("--no-save", dest="save", action="store_false")
    parser.add_argument("--no-spill", dest="spill", action="store_false",
                        help="keep finished blocks' packed tensors in memory until the save (as before spilling)")
    parser.add_argument("--workdir", type=Path, default=Path("."), help="where the model and the output go")
    parser.add_argument("--model", type=Path, default=None, help="a model folder this script wrote before")
    parser.add_argument("--keep", action="store_true", help="keep the written model and the output")
    parser.add_argument("--child", dest="folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.folder is not None:
        child(args)
        return

    folder = args.model or args.workdir / f"llama-{args.hidden}x{args.layers}-bf16"
    out = args.workdir / f"{folder.name}-packed"
    written = args.model is None
    try:
        if written:
            start = time.perf_counter()
            size = write_random_llama_bf16(folder, args.hidden, args.layers, args.intermediate, args.vocab,
                                           args.heads, args.kv_heads)
            print(f"model: {size / 2 / 1e9:.3f}B parameters, {size / 1e9:.2f} GB bf16 ({2 * size / GIB:.2f} GiB "
                  f"in float32), written in {time.perf_counter() - start:.0f}s to {folder}", flush=True)
        size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        command = [sys.executable, __file__, "--child", str(folder), "--out", str(out), "--method", args.method,
                   "--sparsity", str(args.sparsity), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                   "--batch-size", str(args.batch_size), "--solver", args.solver] + ([] if args.save else ["--no-save"]) + \
            (["--mask-search", str(args.mask_search)] if args.mask_search is not None else []) + \
            (["--cg-steps", str(args.cg_steps)] if args.cg_steps is not None else []) + \
            ([] if args.spill else ["--no-spill"])
        start = time.perf_counter()
        peak = 0
        with subprocess.Popen(command, env=os.environ.copy(), stdout=subprocess.PIPE, text=True) as done:
            for line in done.stdout:  # type: ignore[union-attr]
                print(line, end="", flush=True)
                if line.startswith("{") and '"peak_gib"' in line:
                    peak = int(json.loads(line)["peak_gib"] * GIB)
        wall = time.perf_counter() - start
        peak = peak or resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
        status = "ok" if done.returncode == 0 else f"child failed ({done.returncode})"
        packed = (out / "sparsepress.safetensors").stat().st_size if (out / "sparsepress.safetensors").exists() else 0
        print(f"\nCPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}\n"
              f"| layers | method | solver | spill | samples x seq | wall s | peak RSS GiB | bf16 GB | packed GB | status |\n"
              f"|---|---|---|---|---|---|---|---|---|---|\n"
              f"| {args.layers} | {args.method} {args.sparsity:.0%} + int8 | {args.solver} | {'yes' if args.spill else 'no'} | "
              f"{args.samples} x {args.seq_len} | {wall:.0f} | {peak / GIB:.2f} | {size / 1e9:.2f} | {packed / 1e9:.2f} | "
              f"{status} |")
    finally:
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if written:
                shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
