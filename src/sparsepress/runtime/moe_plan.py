"""Mixture-of-experts blocks in the native block plan: a MoE layer (found by the MoE adapter,
`sparsepress.models.moe`) as a `_native.MoeBlock` of the Stack.

The block runs what the module path runs, from the same objects: the router's float32 weight (by the
float kernel, no copy), softmax / top-k / renormalisation as the family does it (`MoeLayer.top_k`,
`MoeLayer.normalize`: Qwen3-MoE and OLMoE's `norm_topk_prob`, Mixtral always), the layer's
`NativeExperts` handle (the grouped kernel the module path calls, `sparsepress.experts.grouped`) and a
shared expert with its sigmoid gate where the family has one (Qwen2-MoE). What it cannot run exactly
is refused with the reason (`_Refused`): experts not unfused into sparsepress's routed form, an expert
matrix without a native kernel, a router with a bias or of another dtype.

`MoeRouting` is what each call reads and writes around the Stack: every MoE layer's adaptive-routing
`top_p` (read at the start of a call, as the module path reads it once per layer and forward) and the
expert counts the grouped kernel keeps (added to each layer's `RoutedExperts.counts` after the call).

Example:
    >>> MoeRouting(stack=None).top_p() is None  # no MoE layers: plain top-k
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..experts.grouped import native_handle as experts_handle
from ..models.moe import MoeLayer
from ..nn import SparseLinear
from ..nn.experts import RoutedExperts
from .plan import PlanGuard, _float_tensor, _member, _projection, _Refused, float_projection


@dataclass
class MoeRouting:
    """The MoE layers of a plan in Stack slot order: their per-call top_p and their counts."""

    stack: Any = field(repr=False)
    experts: list[RoutedExperts] = field(default_factory=list, repr=False)
    _by_values: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)

    def top_p(self) -> torch.Tensor | None:
        """Each MoE layer's top_p now (float32, by slot), or None when every layer routes plain top-k."""
        values = tuple(e.top_p for e in self.experts)
        if all(v is None for v in values):
            return None
        if values not in self._by_values:
            self._by_values[values] = torch.tensor([1.0 if v is None else v for v in values], dtype=torch.float32)
        return self._by_values[values]

    def flush(self) -> None:
        """Add what the Stack's MoE blocks counted since the last flush to each layer's `counts`."""
        for experts, (tokens, evaluations, nbytes) in zip(self.experts, self.stack.take_moe_counts()):
            counts = experts.counts
            counts.tokens += tokens
            counts.evaluations += evaluations
            counts.bytes_read += nbytes


def moe_block(lib: Any, layer: MoeLayer, guard: PlanGuard) -> tuple[Any, list[Any]]:
    """The `_native.MoeBlock` of one MoE layer and the native objects it points into; `_Refused` with the
    reason where the layer cannot run natively exactly."""
    block, family, experts = layer.block, layer.family, layer.experts
    for child in (family.router, family.experts):
        guard.watch(block._modules, child)
    if not isinstance(experts, RoutedExperts):
        raise _Refused(f"{layer.experts_name}: {layer.layout} experts have no native block (the grouped kernel "
                       "runs sparsepress's routed experts: compress or sp.load the model)")
    for index in range(experts.num_experts):
        expert = guard.watch(experts._modules, str(index))
        for proj in ("gate_up_proj", "down_proj"):
            module = guard.watch(expert._modules, proj)
            if not isinstance(module, SparseLinear):
                raise _Refused(f"{layer.experts_name}.{index}.{proj} is a {type(module).__name__}, not a packed layer "
                               "with a native kernel")
            guard.watch(module.__dict__, "packed")
    handle = experts_handle(experts)
    if handle is None:
        raise _Refused(f"{layer.experts_name}: an expert matrix has no native kernel")
    router, held = _router(lib, layer, guard)
    shared: dict[str, Any] = {}
    if family.shared_expert is not None and family.shared_expert in block._modules:
        name = f"{layer.name}.{family.shared_expert}"
        mlp = _member(block, family.shared_expert, layer.name, guard)
        for role, path in (("shared_gate", "gate_proj"), ("shared_up", "up_proj"), ("shared_down", "down_proj")):
            shared[role] = _projection(lib, _member(mlp, path, name, guard), f"{name}.{path}", guard)
        if family.shared_gate is not None and family.shared_gate in block._modules:
            gate = _member(block, family.shared_gate, layer.name, guard)
            shared["shared_scale"], kept = _float_linear(lib, gate, f"{layer.name}.{family.shared_gate}", guard)
            held.append(kept)
    try:
        native = lib.MoeBlock(handle, router, layer.top_k, layer.normalize, **shared)
    except ValueError as exc:
        raise _Refused(f"{layer.name}: {exc}") from None
    return native, [native, router, *shared.values(), *held]


def _router(lib: Any, layer: MoeLayer, guard: PlanGuard) -> tuple[Any, list[Any]]:
    """The router's float32 weight as a projection (transformers' TopKRouter, or a Linear without bias)."""
    router = layer.router
    params = guard.watch(router.__dict__, "_parameters")
    if params.get("bias") is not None:
        raise _Refused(f"{layer.router_name} has a bias (no native router)")
    weight = _float_tensor(guard.watch(params, "weight"), f"{layer.router_name}.weight")
    if "top_k" in router.__dict__:
        guard.watch(router.__dict__, "top_k")
    guard.parameters.append(params["weight"])
    projection, kept = float_projection(lib, weight)  # type: ignore[arg-type]
    return projection, [kept]


def _float_linear(lib: Any, module: nn.Module, name: str, guard: PlanGuard) -> tuple[Any, Any]:
    if type(module) is not nn.Linear:
        raise _Refused(f"{name} is a {type(module).__name__}, not a float Linear")
    params = guard.watch(module.__dict__, "_parameters")
    weight = _float_tensor(guard.watch(params, "weight"), f"{name}.weight")
    bias = _float_tensor(guard.watch(params, "bias"), f"{name}.bias") if params.get("bias") is not None else None
    guard.parameters += [p for p in (params.get("weight"), params.get("bias")) if p is not None]
    return float_projection(lib, weight, bias)  # type: ignore[arg-type]


__all__ = ["MoeRouting", "moe_block"]
