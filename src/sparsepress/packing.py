"""Pick the packed format of one compressed layer: the fastest measured, or the smallest.

Example:
    >>> import torch
    >>> from sparsepress.prune.solve import CompressedWeight
    >>> w = torch.zeros(8, 16); w[:, :2] = 1.0
    >>> cw = CompressedWeight(weight=w, mask=w != 0, scales=None, bits=None, group_size=None)
    >>> layer, meta = choose_packing(torch.nn.Linear(16, 8), cw, None, "auto", measure=False)
    >>> meta["format"]
    'bitmask'
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .formats import FORMATS, PackedWeight
from .nn import SparseLinear
from .prune.solve import CompressedWeight
from .recipe import PruneStage

DTYPE_OF_BITS = {8: "int8", 4: "int4", None: "fp32"}


def _format_params(name: str, prune: PruneStage | None) -> dict[str, int]:
    if prune is None:
        return {}
    pattern = prune.parsed_pattern
    if name == "nm" and pattern.kind == "nm":
        return {"n": int(pattern.n), "m": int(pattern.m)}  # type: ignore[arg-type]
    if name == "bbs":
        return {"bank": prune.bank}
    return {}


def candidate_formats(result: CompressedWeight, prune: PruneStage | None, requested: str) -> list[str]:
    """Formats worth trying for a layer: the requested one, or (auto) every one its zeros can fit.

    Example:
        >>> candidate_formats(CompressedWeight(torch.ones(2, 2), None, None, None, None), None, "auto")
        ['dense']
    """
    if result.mask is None:
        return ["dense"]
    if requested != "auto":
        return [requested]
    names = ["dense", "bitmask", "csr"]
    if prune is not None:
        names += [n for n in ("nm", "bbs") if prune.parsed_pattern.kind == n]
    return names


# `auto` keeps the smallest format unless a larger one is at least this much faster: a saved model
# should not grow for a speed gain lost in measurement noise.
AUTO_SPEEDUP_TO_GROW = 1.2
# Rows of x when timing candidates: a short sequence, the common small-batch case of an encoder.
AUTO_MEASURE_ROWS = 16


# Rounds of the round-robin timing of the candidates (each round calls every candidate 3 times).
AUTO_MEASURE_ROUNDS = 12


def measured_ms(packs: list[PackedWeight], bias: torch.Tensor | None) -> dict[str, float]:
    """Median ms per call of every candidate with a native kernel, at AUTO_MEASURE_ROWS rows.

    The candidates are timed round-robin (`evaluate.interleaved_ms`), so a slow phase of the machine
    hits them all alike: timed one after the other, a MiniLM layer's 15-microsecond calls let
    noise pass for the 1.2x that makes `auto` store a layer dense.

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> measured_ms([DenseWeight.pack(torch.ones(8, 8))], None)  # one candidate: nothing to compare
        {}
    """
    from . import kernels
    from .evaluate import interleaved_ms

    native = [p for p in packs if kernels.native_supports(p)]
    if len(native) < 2:
        return {}
    x = torch.randn(AUTO_MEASURE_ROWS, native[0].shape[1])

    def runner(packed: PackedWeight):
        return lambda: kernels.packed_linear(x, packed, bias)

    try:
        with torch.inference_mode():
            return interleaved_ms({p.name: runner(p) for p in native}, rounds=AUTO_MEASURE_ROUNDS, per_round=3)
    finally:
        # the timing's native handles (and any GEMM panels they built) are not the model's to keep:
        # compressing a big model must not hold panels for every layer it measured
        for packed in native:
            kernels.release_plan(packed)


def pick_auto(packs: list[PackedWeight], timings: dict[str, float]) -> PackedWeight:
    """The smallest pack, or a larger one measured at least AUTO_SPEEDUP_TO_GROW times faster.

    Example:
        >>> from sparsepress.formats import DenseWeight, BitmaskWeight
        >>> w = torch.zeros(4, 16); w[:, 0] = 1.0
        >>> packs = [DenseWeight.pack(w, dtype="int8"), BitmaskWeight.pack(w, dtype="int8")]
        >>> pick_auto(packs, {"dense": 1.0, "bitmask": 1.1}).name, pick_auto(packs, {"dense": 1.0, "bitmask": 1.3}).name
        ('bitmask', 'dense')
    """
    by_size = sorted(packs, key=lambda p: p.nbytes)
    chosen = by_size[0]
    for candidate in by_size[1:]:
        if candidate.name in timings and chosen.name in timings:
            if timings[chosen.name] >= AUTO_SPEEDUP_TO_GROW * timings[candidate.name]:
                chosen = candidate
    return chosen


def choose_packing(
    linear: nn.Linear, result: CompressedWeight, prune: PruneStage | None, requested: str, measure: bool = True
) -> tuple[SparseLinear, dict[str, Any]]:
    """Pack `result` into a SparseLinear in the requested format, or the best candidate for `auto`.

    `auto` keeps the smallest candidate unless a larger one's native kernel is measured at least
    `AUTO_SPEEDUP_TO_GROW` times faster (without native kernels: the smallest).
    """
    dtype = DTYPE_OF_BITS[result.bits]
    packs: list[PackedWeight] = []
    errors = []
    for name in candidate_formats(result, prune, requested):
        try:
            packs.append(
                FORMATS[name].pack(result.weight, dtype=dtype, scales=result.scales, group_size=result.group_size,
                                   **_format_params(name, prune))
            )
        except ValueError as exc:
            errors.append(f"{name}: {exc}")
    if not packs:
        raise ValueError("; ".join(errors))
    timings: dict[str, float] = {}
    if measure and len(packs) > 1:
        timings = measured_ms(packs, linear.bias)
    chosen = pick_auto(packs, timings)
    layer = SparseLinear(chosen, linear.bias)
    meta = {"format": chosen.name, "dtype": dtype, "sparsity": chosen.sparsity, "nbytes": layer.nbytes}
    if timings:
        meta["measured_ms"] = {k: round(v, 4) for k, v in sorted(timings.items())}
    return layer, meta
