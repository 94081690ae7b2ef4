"""User metrics and grids for the sweep tests (named `sweep_helpers:function` in grid settings).

Example:
    >>> "settings" in tiny_grid_text(["0.5"])
    True
"""

from __future__ import annotations

import json
import os
from pathlib import Path

CALLS_ENV = "SPARSEPRESS_TEST_SWEEP_CALLS"


def _recipe_of(model) -> dict:
    manifest = getattr(model, "sparsepress_manifest", None)
    return manifest["recipe"] if manifest else {"dense": True}


def record_call(model, reference) -> float:
    """Append the trial's recipe to the file named by $SPARSEPRESS_TEST_SWEEP_CALLS; return its mean sparsity."""
    with open(os.environ[CALLS_ENV], "a") as handle:
        handle.write(json.dumps(_recipe_of(model), sort_keys=True) + "\n")
    manifest = getattr(model, "sparsepress_manifest", None)
    if not manifest:
        return 0.0
    layers = manifest["layers"].values()
    return sum(meta["sparsity"] for meta in layers) / len(layers)


def interrupt_second_call(model, reference) -> float:
    """Like record_call, but the second trial ever recorded is a Ctrl-C (a run interrupted mid-sweep)."""
    before = len([c for c in calls() if "dense" not in c])
    value = record_call(model, reference)
    if before == 1 and getattr(model, "sparsepress_manifest", None):
        raise KeyboardInterrupt
    return value


def calls() -> list[dict]:
    """The recipes recorded so far (the dense model's call as {"dense": true})."""
    path = Path(os.environ[CALLS_ENV])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def tiny_grid_text(
    sparsities: list[str],
    *,
    metric: str | None = "record_call",
    latency: bool = True,
    targets: str | None = None,
) -> str:
    """A data-free-ish grid (magnitude + RTN, plain solver) for the tiny BERT: small, fast trials."""
    lines = [
        "recipe:",
        "  stages:",
        "    - prune: {method: magnitude, sparsity: 0.5}",
        "    - quantize: {method: rtn, bits: 8}",
        "  solver: {mask_search: 0}",
        # a fixed format: `auto` picks by timing the kernels, so a loaded machine could store a layer
        # differently in two runs, and the resume test compares folder sizes byte for byte
        "  format: bitmask",
        "vary:",
        f"  stages.0.prune.sparsity: [{', '.join(sparsities)}]",
    ]
    if targets:
        lines.append(f"  stages.0.prune.targets: {targets}")
    lines += [
        "settings:",
        "  samples: 4",
        "  seq_len: 32",
        "  eval_samples: 4",
        "  eval_seq_len: 32",
        "  latency: {batch: 1, seq_len: 16, rounds: 2}" if latency else "  latency: null",
    ]
    if metric:
        lines.append(f"  user_metric: sweep_helpers:{metric}")
    return "\n".join(lines) + "\n"
