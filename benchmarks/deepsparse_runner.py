"""Times an ONNX model in DeepSparse (run with the Python of a separate venv holding deepsparse==1.8.0).

Prints one JSON line: {"batch": B, "seq_len": L, "ms": median}. Used by benchmarks/e2e.py.

Example:
    python benchmarks/deepsparse_runner.py model.onnx --batch 32 --seq-len 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("onnx")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import numpy as np
    from deepsparse import compile_model

    engine = compile_model(args.onnx, batch_size=args.batch, num_cores=args.threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 2000, size=(args.batch, args.seq_len), dtype=np.int64)
    inputs = [ids, np.ones_like(ids), np.zeros_like(ids)][: len(engine.input_names)]
    for _ in range(3):
        engine.run(inputs)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        engine.run(inputs)
        times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"batch": args.batch, "seq_len": args.seq_len, "ms": statistics.median(times)}))


if __name__ == "__main__":
    main()
