"""Mixture-of-experts adapters: where a model keeps its MoE layers, and how their experts are stored.

A family (`MOE_FAMILIES`, by `config.model_type`) names the config fields of its routing (how many
experts, top-k, whether the top-k weights are renormalised) and the children of its MoE block (the
router and the experts). A MoE layer is any module with those two children whose experts are either
- **fused** (transformers 5): one module with 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I];
- **routed** (sparsepress): `RoutedExperts`, one `Expert` of two Linear layers per expert, made from
  the fused form by `unfuse_experts_` (weights shared, not copied) and turned back by `fuse_experts_`;
- **list** (older transformers, remote code): a ModuleList of per-expert MLPs of nn.Linear layers, with a
  Linear router.
Routing reproduces each family's router (softmax over the experts, top-k, optional renormalisation),
so routing statistics and expert removal work on every layout.

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = Qwen3MoeForCausalLM(config).eval()
    >>> [(layer.name, layer.layout, layer.num_experts, layer.top_k) for layer in find_moe_layers(model)]
    [('model.layers.0.mlp', 'fused', 4, 2)]
    >>> ids = torch.randint(0, 64, (1, 5))
    >>> before = model(ids).logits
    >>> _ = unfuse_experts_(model); find_moe_layers(model)[0].layout
    'routed'
    >>> torch.allclose(model(ids).logits, before, atol=1e-5)
    True
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..nn.experts import HF_ACTIVATIONS, Expert, RoutedExperts


@dataclass(frozen=True)
class MoeFamily:
    """How one transformers family keeps its MoE layers.

    `experts_key`: the config field with the number of routed experts per layer; `normalize_key`: the
    config flag saying whether the top-k weights are renormalised to sum 1 (None: always);
    `router` / `experts`: the MoE block's children; `shared_expert` / `shared_gate`: a shared expert
    every token goes through (a gated MLP) and the [1, hidden] Linear whose sigmoid scales it (Qwen2-MoE).

    Example:
        >>> MOE_FAMILIES["mixtral"].experts_key
        'num_local_experts'
    """

    experts_key: str
    normalize_key: str | None = "norm_topk_prob"
    top_k_key: str = "num_experts_per_tok"
    router: str = "gate"
    experts: str = "experts"
    shared_expert: str | None = None
    shared_gate: str | None = None

    def normalizes(self, config: Any) -> bool:
        return True if self.normalize_key is None else bool(getattr(config, self.normalize_key, False))


MOE_FAMILIES: dict[str, MoeFamily] = {
    "mixtral": MoeFamily("num_local_experts", normalize_key=None),
    "qwen2_moe": MoeFamily("num_experts", shared_expert="shared_expert", shared_gate="shared_expert_gate"),
    "qwen3_moe": MoeFamily("num_experts"),
    "olmoe": MoeFamily("num_experts"),
}


def _is_fused(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return "gate_up_proj" in params and "down_proj" in params and params["gate_up_proj"].dim() == 3


def _expert_linears(expert: nn.Module) -> list[nn.Module]:
    return [m for m in expert.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear"]


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, nn.ModuleList) and len(module) > 0 and all(_expert_linears(e) for e in module)


@dataclass
class MoeLayer:
    """One MoE layer of a model: its block, router and experts, and how it routes.

    `layout`: fused | routed | list (see the module docstring).
    """

    name: str
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    family: MoeFamily
    top_k: int
    normalize: bool

    @property
    def layout(self) -> str:
        if isinstance(self.experts, RoutedExperts):
            return "routed"
        return "fused" if _is_fused(self.experts) else "list"

    @property
    def num_experts(self) -> int:
        if self.layout == "fused":
            return int(self.experts.gate_up_proj.shape[0])
        return len(self.experts)  # type: ignore[arg-type]

    @property
    def router_name(self) -> str:
        return f"{self.name}.{self.family.router}"

    @property
    def experts_name(self) -> str:
        return f"{self.name}.{self.family.experts}"

    @property
    def router_weight(self) -> torch.Tensor:
        """The router's [E, H] weight (a Linear router or transformers' TopKRouter)."""
        return self.router.weight  # type: ignore[return-value]

    def router_logits(self, output: Any) -> torch.Tensor:
        """The [T, E] router logits in the router module's output (a tuple for transformers' routers)."""
        logits = output[0] if isinstance(output, tuple) else output
        return logits.reshape(-1, logits.shape[-1])

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], index [T, k]) the model gives each token: softmax, top-k, renormalised or not."""
        probs = F.softmax(logits.float(), dim=-1)
        weights, index = torch.topk(probs, min(self.top_k, probs.shape[-1]), dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, index

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's output for inputs x [n, H] (unweighted)."""
        if self.layout == "routed":
            return self.experts[e](x, self.experts.act_fn)  # type: ignore[index, operator]
        if self.layout == "list":
            return self.experts[e](x)  # type: ignore[index, operator]
        gate, up = F.linear(x, self.experts.gate_up_proj[e]).chunk(2, dim=-1)  # type: ignore[index]
        return F.linear(self.experts.act_fn(gate) * up, self.experts.down_proj[e])  # type: ignore[index, operator]


def moe_family(model: nn.Module) -> MoeFamily | None:
    """The MoE family of `model`'s config, or None for models without one.

    Example:
        >>> moe_family(nn.Linear(2, 2)) is None
        True
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return MOE_FAMILIES.get(model_type or "")


def find_moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The MoE layers of `model` in module order (empty for dense models); see the module example."""
    family = moe_family(model)
    if family is None:
        return []
    config = model.config  # type: ignore[attr-defined]
    found = []
    for name, module in model.named_modules():
        router = getattr(module, family.router, None)
        experts = getattr(module, family.experts, None)
        if not isinstance(router, nn.Module) or not isinstance(experts, nn.Module):
            continue
        weight = getattr(router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if not (isinstance(experts, RoutedExperts) or _is_fused(experts) or _is_list(experts)):
            continue
        top_k = int(getattr(router, "top_k", None) or getattr(module, "top_k", None) or getattr(config, family.top_k_key))
        found.append(MoeLayer(name, module, router, experts, family, top_k, family.normalizes(config)))
    return found


def router_names(model: nn.Module) -> set[str]:
    """Qualified names of every MoE router and shared-expert gate: tiny, routing-critical Linear layers
    (or transformers routers) that compression leaves dense.

    Example:
        >>> router_names(nn.Linear(2, 2))
        set()
    """
    names = set()
    for layer in find_moe_layers(model):
        names.add(layer.router_name)
        for child, module in layer.block.named_children():
            if isinstance(module, nn.Linear) and module.out_features == 1:  # a shared expert's sigmoid gate
                names.add(f"{layer.name}.{child}")
    return names


def _activation(experts: nn.Module, config: Any) -> str | Callable[[torch.Tensor], torch.Tensor]:
    name = HF_ACTIVATIONS.get(str(getattr(config, "hidden_act", "")))
    return name if name is not None else experts.act_fn  # type: ignore[return-value]


def _check_fused_layout(layer: MoeLayer) -> None:
    experts = layer.experts
    unsupported = [flag for flag, bad in (("has_bias", True), ("is_transposed", True), ("is_concatenated", False))
                   if getattr(experts, flag, not bad) == bad]
    if unsupported or getattr(experts, "has_gate", True) is False:
        raise InputError(layer.experts_name, f"fused experts with {', '.join(unsupported) or 'no gate'} are not supported")


def unfuse_experts_(model: nn.Module) -> nn.Module:
    """Turn every fused experts module into a `RoutedExperts` whose Linear weights are views of the fused
    parameters (no copy); the model computes the same. Routed and list layouts are left as they are.

    See the module example.
    """
    config = getattr(model, "config", None)
    for layer in find_moe_layers(model):
        if layer.layout != "fused":
            continue
        _check_fused_layout(layer)
        fused = layer.experts
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        experts = []
        for e in range(gate_up.shape[0]):
            gu = nn.Linear(gate_up.shape[2], gate_up.shape[1], bias=False, device="meta")
            dn = nn.Linear(down.shape[2], down.shape[1], bias=False, device="meta")
            gu.weight = nn.Parameter(gate_up[e], requires_grad=False)
            dn.weight = nn.Parameter(down[e], requires_grad=False)
            experts.append(Expert(gu, dn))
        routed = RoutedExperts(experts, _activation(fused, config), source_class=type(fused))
        setattr(layer.block, layer.family.experts, routed)
    return model


def _dense_weight(module: nn.Module) -> torch.Tensor:
    weight = module.weight  # SparseLinear.weight dequantizes
    return weight.detach().float()


def fused_state(experts: RoutedExperts) -> dict[str, torch.Tensor]:
    """The fused [E, ...] dense tensors of routed experts (packed ones dequantized).

    Example:
        >>> routed = RoutedExperts([Expert(nn.Linear(4, 6, bias=False), nn.Linear(3, 4, bias=False))], "silu")
        >>> {k: tuple(v.shape) for k, v in fused_state(routed).items()}
        {'gate_up_proj': (1, 6, 4), 'down_proj': (1, 4, 3)}
    """
    if any(getattr(m, "bias", None) is not None for m in experts.projections()):
        raise InputError("experts", "experts with biases have no transformers fused form")
    return {"gate_up_proj": torch.stack([_dense_weight(e.gate_up_proj) for e in experts]),
            "down_proj": torch.stack([_dense_weight(e.down_proj) for e in experts])}


def fuse_experts_(model: nn.Module) -> nn.Module:
    """Turn every `RoutedExperts` back into its transformers experts class holding dense fused weights
    (packed experts dequantized), so that the model is plain transformers again (export, save_pretrained).

    Example:
        >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
        >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
        ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
        ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
        >>> model = unfuse_experts_(Qwen3MoeForCausalLM(config))
        >>> type(fuse_experts_(model).model.layers[0].mlp.experts).__name__
        'Qwen3MoeExperts'
    """
    config = model.config  # type: ignore[attr-defined]
    for layer in find_moe_layers(model):
        routed = layer.experts
        if not isinstance(routed, RoutedExperts):
            continue
        if routed.source_class is None:
            raise InputError(layer.experts_name, "does not record the transformers class it was unfused from")
        layer_config = copy.copy(config)
        setattr(layer_config, layer.family.experts_key, routed.num_experts)
        with torch.device("meta"):
            fused = routed.source_class(layer_config)
        for key, tensor in fused_state(routed).items():
            setattr(fused, key, nn.Parameter(tensor, requires_grad=False))
        setattr(layer.block, layer.family.experts, fused)
    return model


def fold_expert_tensors(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with the routed experts' per-expert weights (`...experts.3.gate_up_proj.weight`)
    stacked into transformers' fused tensors (`...experts.gate_up_proj`), for exporters that build a
    plain transformers model.

    Example:
        >>> fold_expert_tensors({"a": torch.ones(1)}, nn.Linear(1, 1))
        {'a': tensor([1.])}
    """
    out = dict(state)
    for layer in find_moe_layers(model):
        if not isinstance(layer.experts, RoutedExperts):
            continue
        prefix = layer.experts_name
        for proj in ("gate_up_proj", "down_proj"):
            keys = [f"{prefix}.{e}.{proj}.weight" for e in range(layer.experts.num_experts)]
            if all(k in out for k in keys):
                out[f"{prefix}.{proj}"] = torch.stack([out.pop(k) for k in keys])
    return out


def set_config_experts_(model: nn.Module) -> None:
    """Write the number of experts per MoE layer into the config (the largest, where layers differ).

    Example:
        >>> set_config_experts_(nn.Linear(1, 1))
    """
    layers = find_moe_layers(model)
    if not layers:
        return
    counts = {layer.num_experts for layer in layers}
    config = model.config  # type: ignore[attr-defined]
    setattr(config, layers[0].family.experts_key, max(counts))
    top_k = min(layer.top_k for layer in layers)
    if getattr(config, layers[0].family.top_k_key, top_k) > top_k:
        setattr(config, layers[0].family.top_k_key, top_k)
