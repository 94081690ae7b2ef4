"""Memory and time of one LLaMA-7B-shaped block's layer solve (SparseGPT 50% + GPTQ int8, default solver).

Builds a one-block LlamaForCausalLM (hidden 4096, intermediate 11008, 32 heads; a small vocabulary so the
embeddings do not count) with random float32 weights, compresses it with `sp.compress` exactly as the
pipeline does (dense twin, sequential groups, dense targets, ADMM mask search, refits, GPTQ) on random
calibration tokens, and reports the wall time, the peak RSS over the process's RSS before the solve (VmHWM
and a 10 ms sampler) and the Python stack the sampler saw at the peak. `--mask-search` and `--cg-steps`
shorten the iterations for a memory-only reading: every step reuses the same buffers, so the peak does not
depend on their count.

Example:
    PYTHONPATH=src python benchmarks/block_solve.py                                 # the full solve
    PYTHONPATH=src python benchmarks/block_solve.py --mask-search 1 --cg-steps 1    # the memory peak, quickly
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

import torch

GIB = 1024**3


def rss() -> int:
    """This process's resident set in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakStack:
    """The largest RSS a 10 ms sampling thread saw, and the main thread's stack at that moment.

    Example:
        >>> with PeakStack() as sampler: pass
        >>> sampler.peak > 0
        True
    """

    def __init__(self, every: float = 0.01):
        self.every, self.peak, self.stack = every, 0, []
        self.main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = rss()
            if now > self.peak:
                self.peak = now
                frame = sys._current_frames().get(self.main)
                self.stack = [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in traceback.extract_stack(frame)][-7:]
            self._stop.wait(self.every)

    def __enter__(self) -> PeakStack:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--mask-search", type=int, default=30)
    parser.add_argument("--cg-steps", type=int, default=None, help="refit iterations (default: the library's)")
    args = parser.parse_args()
    import sparsepress as sp
    from sparsepress.prune import refit
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.cg_steps is not None:
        refit.CG_ITERATIONS = args.cg_steps  # a benchmark's shortcut: the library takes no such knob
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=1, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 0.02) if param.dim() == 2 else param.fill_(1.0)
    gen = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, config.vocab_size, (args.seq_len,), generator=gen) for _ in range(args.samples)]
    recipe = {"stages": [{"prune": {"method": "sparsegpt", "sparsity": 0.5}}, {"quantize": {"method": "gptq", "bits": 8}}],
              "format": "bitmask", "solver": {"mask_search": args.mask_search}}
    base = rss()
    start = time.perf_counter()
    with PeakStack() as sampler:
        sp.compress(model, recipe, calibration=ids, samples=args.samples, seq_len=args.seq_len)
    wall = time.perf_counter() - start
    print(json.dumps({"wall_s": round(wall, 1), "rss_before_gib": round(base / GIB, 3),
                      "peak_gib": round(sampler.peak / GIB, 3), "solve_peak_over_before_gib": round((sampler.peak - base) / GIB, 3),
                      "mask_search": args.mask_search, "cg_steps": args.cg_steps or refit.CG_ITERATIONS,
                      "torch_threads": torch.get_num_threads()}))
    print("stack at the peak:\n  " + "\n  ".join(sampler.stack))


if __name__ == "__main__":
    main()
