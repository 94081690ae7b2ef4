"""What a model folder records of its MoE layers (the manifest's `experts` entry), and how a loaded
model gets its MoE layers back in the form they were saved in.

A sparsepress folder of a MoE model always stores the experts unfused (one matrix per expert and
projection: `...mlp.experts.3.gate_up_proj...`), packed or dense. The manifest's `experts` entry says
so and holds, per MoE layer, its number of experts (the config holds the largest; a layer with fewer is
trimmed on load: the one case the config cannot express, kept in our folder format only), the
original ids of the experts it kept, what was removed or merged, and its routing statistics; plus the
default top_p and the calibrated routing operating points.

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from sparsepress.models.moe import unfuse_experts_
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> entry = experts_manifest(unfuse_experts_(Qwen3MoeForCausalLM(config)), None)
    >>> entry["layers"]["model.layers.0.mlp"]["experts"], entry["layout"]
    (4, 'routed')
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import TensorLayoutError
from ..models.moe import find_moe_layers, unfuse_experts_
from ..nn.experts import RoutedExperts
from .adaptive import RoutingPoint
from .routing import RoutingStats


@dataclass
class ExpertsRecord:
    """What the MoE passes of one compression did (kept in `CompressionRecord.extra["experts"]`)."""

    routing: RoutingStats = field(default_factory=dict)
    removed: dict[str, dict[int, int | None]] = field(default_factory=dict)
    by: str | None = None
    top_p: float | None = None
    points: list[RoutingPoint] = field(default_factory=list)
    max_loss_rise: float | None = None

    @property
    def levels(self) -> list[float]:
        """top_p levels within the quality floor, plain top-k (1.0) first."""
        floor = self.max_loss_rise if self.max_loss_rise is not None else 0.0
        return sorted({p.top_p for p in self.points if p.loss_rise <= floor} | ({1.0} if self.points else set()),
                      reverse=True)


def experts_manifest(model: nn.Module, previous: Any) -> dict[str, Any] | None:
    """The manifest entry of `model`'s MoE layers (None for models without routed experts).

    `previous`: an ExpertsRecord from a compression, or the entry of the manifest the model was loaded
    from (kept where the model did not change).
    """
    layers = [layer for layer in find_moe_layers(model) if isinstance(layer.experts, RoutedExperts)]
    if not layers:
        return None
    old = previous if isinstance(previous, dict) else {}
    entry: dict[str, Any] = {"layout": "routed", "layers": {}}
    for layer in layers:
        before = old.get("layers", {}).get(layer.name, {})
        body: dict[str, Any] = {"experts": layer.num_experts, "top_k": layer.top_k}
        if isinstance(previous, ExpertsRecord):
            routing = previous.routing.get(layer.name)
            if routing is not None:
                body["kept"] = list(routing.kept)
                body["routing"] = routing.to_json()
            if layer.name in previous.removed:
                body["removed"] = {str(k): v for k, v in previous.removed[layer.name].items()}
        else:
            body.update({k: v for k, v in before.items() if k in ("kept", "routing", "removed")})
        entry["layers"][layer.name] = body
    top_p = {layer.experts.top_p for layer in layers}  # type: ignore[union-attr]
    entry["top_p"] = top_p.pop() if len(top_p) == 1 else None
    if isinstance(previous, ExpertsRecord):
        entry["by"] = previous.by
        entry["operating_points"] = [p.to_json() for p in previous.points]
        entry["levels"] = previous.levels
        entry["max_loss_rise"] = previous.max_loss_rise
    else:
        entry.update({k: old[k] for k in ("by", "operating_points", "levels", "max_loss_rise") if k in old})
    return entry


def _trim_(model: nn.Module, name: str, count: int, where: Any) -> None:
    for layer in find_moe_layers(model):
        if layer.name != name:
            continue
        if not isinstance(layer.experts, RoutedExperts) or count > layer.num_experts or count < 1:
            raise TensorLayoutError(where, f"MoE layer '{name}': {count} experts do not fit the config's {layer.num_experts}")
        if count < layer.num_experts:
            keep = list(range(count))
            layer.experts.set_experts_([layer.experts[e] for e in keep])
            router = layer.router
            with torch.no_grad():
                router.weight = nn.Parameter(router.weight.detach()[:count].clone(), requires_grad=False)
            for owner in (router, layer.block):
                if isinstance(getattr(owner, "num_experts", None), int):
                    owner.num_experts = count
        return
    raise TensorLayoutError(where, f"MoE layer '{name}' is not in the model")


def restore_experts_(model: nn.Module, entry: Any, where: Any = "sparsepress.json") -> None:
    """Give a freshly built model the MoE form of the folder: experts unfused, per-layer expert counts,
    top_p and routing operating points (for the runtime controller)."""
    if not isinstance(entry, dict) or entry.get("layout") != "routed" or not isinstance(entry.get("layers"), dict):
        raise TensorLayoutError(where, f"bad experts entry {entry!r}")
    unfuse_experts_(model)
    for name, body in entry["layers"].items():
        count = body.get("experts") if isinstance(body, dict) else None
        if not isinstance(count, int):
            raise TensorLayoutError(where, f"MoE layer '{name}': bad entry {body!r}")
        _trim_(model, name, count, where)
    top_p = entry.get("top_p")
    for experts in model.modules():
        if isinstance(experts, RoutedExperts):
            experts.top_p = float(top_p) if isinstance(top_p, (int, float)) and top_p < 1 else None
    levels = entry.get("levels")
    if isinstance(levels, list) and all(isinstance(v, (int, float)) for v in levels):
        model.sparsepress_routing_levels = [float(v) for v in levels]  # type: ignore[attr-defined]
