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

_DTYPE_OF_BITS = {8: "int8", 4: "int4", None: "fp32"}


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


def _measured_ms(packed: PackedWeight, bias: torch.Tensor | None) -> float | None:
    try:
        from . import kernels
    except ImportError:
        return None
    if not getattr(kernels, "native_supports", lambda p: False)(packed):
        return None
    return kernels.measure_ms(packed, bias, batch=1)


def choose_packing(
    linear: nn.Linear, result: CompressedWeight, prune: PruneStage | None, requested: str, measure: bool = True
) -> tuple[SparseLinear, dict[str, Any]]:
    """Pack `result` into a SparseLinear in the requested format, or the best candidate for `auto`.

    `auto` takes the fastest measured native kernel where every candidate has one, else the smallest.
    """
    dtype = _DTYPE_OF_BITS[result.bits]
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
    chosen = min(packs, key=lambda p: p.nbytes)
    timings: dict[str, float] = {}
    if measure and len(packs) > 1:
        for packed in packs:
            ms = _measured_ms(packed, linear.bias)
            if ms is not None:
                timings[packed.name] = ms
        if len(timings) == len(packs):
            chosen = min(packs, key=lambda p: (timings[p.name], p.nbytes))
    layer = SparseLinear(chosen, linear.bias)
    meta = {"format": chosen.name, "dtype": dtype, "sparsity": chosen.sparsity, "nbytes": layer.nbytes}
    if timings:
        meta["measured_ms"] = timings
    return layer, meta
