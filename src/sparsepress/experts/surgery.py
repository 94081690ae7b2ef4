"""Expert removal and merging: the least useful experts of each MoE layer go, the router follows.

Usefulness per expert comes from the routing statistics (`sparsepress.experts.routing`): `frequency`
(tokens routed), `gate_mass` (routing weight received) or `reap` (router-weighted expert output norm,
Lasby et al. 2025); `random` is the baseline. Each MoE layer loses `floor(prune * E)` experts (never
below its top-k). Removing an expert deletes its router row: the softmax then spreads over the kept
experts only (the router renormalises itself), tokens that chose a removed expert fall to their next
choice, and top-k renormalisation (where the family has it) still applies. The config's expert count
is rewritten; every layer loses the same number of experts, so it stays a plain transformers config.

Merging (MC-SMoE style, Li et al. 2024) folds each removed expert into the kept expert whose router
logits correlate most with its own over the calibration tokens: the removed expert's intermediate
neurons are matched to the kept one's (greedy assignment on the cosine of their gate, up and down
weights), then the two are averaged weighted by their token counts; the kept expert keeps its router
row.

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from sparsepress.calibration import make_batches
    >>> from sparsepress.experts.routing import collect_routing
    >>> from sparsepress.models.moe import find_moe_layers, unfuse_experts_
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = unfuse_experts_(Qwen3MoeForCausalLM(config).eval())
    >>> stats = collect_routing(model, make_batches([torch.randint(0, 64, (12,))], 1, 0))
    >>> removed = remove_experts_(model, stats, prune=0.5, by="reap")
    >>> model.config.num_experts, find_moe_layers(model)[0].router.weight.shape[0], len(removed["model.layers.0.mlp"])
    (2, 2, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..models.moe import MoeLayer, find_moe_layers, set_config_experts_
from ..nn.experts import Expert, RoutedExperts
from .routing import LayerRouting, RoutingStats

SCORERS: dict[str, Callable[[LayerRouting, torch.Generator], torch.Tensor]] = {
    "frequency": lambda r, g: r.tokens,
    "gate_mass": lambda r, g: r.gate_mass,
    "reap": lambda r, g: r.reap,
    "random": lambda r, g: torch.rand(r.num_experts, generator=g, dtype=torch.float64),
}


def experts_to_keep(routing: LayerRouting, prune: float, by: str, generator: torch.Generator | None = None) -> list[int]:
    """The current indices of the experts a layer keeps (ascending): all but the `floor(prune * E)` lowest
    scoring `by`, never fewer than top-k.

    Example:
        >>> r = LayerRouting.empty(4, 1); r.tokens += torch.tensor([5.0, 1.0, 9.0, 3.0])
        >>> experts_to_keep(r, 0.5, "frequency")
        [0, 2]
    """
    n = routing.num_experts
    drop = min(int(math.floor(prune * n + 1e-9)), n - routing.top_k)
    if drop <= 0:
        return list(range(n))
    scores = SCORERS[by](routing, generator or torch.Generator().manual_seed(0))
    order = torch.argsort(scores.double(), stable=True)
    return sorted(order[drop:].tolist())


@dataclass(frozen=True)
class Merge:
    """A removed expert folded into a kept one (current indices before removal) with their token counts."""

    removed: int
    into: int
    removed_tokens: float
    into_tokens: float


def merge_partners(routing: LayerRouting, keep: list[int]) -> list[Merge]:
    """Each removed expert with the kept expert whose router logits correlate most with its own.

    Example:
        >>> r = LayerRouting.empty(3, 1); r.n_tokens = 2
        >>> r.logit_sum += torch.tensor([0.0, 0.0, 0.0]); r.logit_gram += torch.tensor([[2.0, 2.0, -2.0], [2.0, 2.0, -2.0], [-2.0, -2.0, 2.0]])
        >>> [(m.removed, m.into) for m in merge_partners(r, [1, 2])]
        [(0, 1)]
    """
    similarity = routing.logit_similarity()
    kept = torch.tensor(keep)
    merges = []
    for r in range(routing.num_experts):
        if r in keep:
            continue
        into = int(kept[similarity[r, kept].argmax()])
        merges.append(Merge(r, into, float(routing.tokens[r]), float(routing.tokens[into])))
    return merges


def _neuron_features(expert: Expert) -> torch.Tensor:
    """Per intermediate neuron: its gate row, up row and down column, concatenated [I, 3H]."""
    gate_up = expert.gate_up_proj.weight.detach().float()
    down = expert.down_proj.weight.detach().float()
    inter = down.shape[1]
    return torch.cat([gate_up[:inter], gate_up[inter:], down.T], dim=1)


def align_neurons(target: Expert, other: Expert) -> torch.Tensor:
    """A permutation p with `other`'s neuron p[j] matched to `target`'s neuron j (greedy on cosine).

    Example:
        >>> a = Expert(nn.Linear(2, 4, bias=False), nn.Linear(2, 2, bias=False))
        >>> b = Expert(nn.Linear(2, 4, bias=False), nn.Linear(2, 2, bias=False))
        >>> with torch.no_grad():
        ...     _ = b.gate_up_proj.weight.copy_(a.gate_up_proj.weight[[1, 0, 3, 2]])
        ...     _ = b.down_proj.weight.copy_(a.down_proj.weight[:, [1, 0]])
        >>> align_neurons(a, b).tolist()
        [1, 0]
    """
    fa = torch.nn.functional.normalize(_neuron_features(target), dim=1)
    fb = torch.nn.functional.normalize(_neuron_features(other), dim=1)
    sim = fa @ fb.T
    n = sim.shape[0]
    perm = torch.full((n,), -1, dtype=torch.long)
    order = torch.argsort(sim.flatten(), descending=True)
    used_a = torch.zeros(n, dtype=torch.bool)
    used_b = torch.zeros(n, dtype=torch.bool)
    left = n
    for flat in order.tolist():
        i, j = divmod(flat, n)
        if used_a[i] or used_b[j]:
            continue
        perm[i] = j
        used_a[i] = used_b[j] = True
        left -= 1
        if left == 0:
            break
    return perm


def merge_experts(target: Expert, others: list[tuple[Expert, float]], target_tokens: float) -> Expert:
    """`target` averaged with `others` (each aligned to it first), weighted by token counts; new dense Linears."""
    inter = target.down_proj.weight.shape[1]
    total = max(target_tokens, 1e-9)
    gate_up = target.gate_up_proj.weight.detach().float() * total
    down = target.down_proj.weight.detach().float() * total
    for other, tokens in others:
        perm = align_neurons(target, other)
        rows = torch.cat([perm, perm + inter])
        gate_up = gate_up + other.gate_up_proj.weight.detach().float()[rows] * tokens
        down = down + other.down_proj.weight.detach().float()[:, perm] * tokens
        total += tokens
    gu = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False)
    dn = nn.Linear(down.shape[1], down.shape[0], bias=False)
    with torch.no_grad():
        gu.weight.copy_(gate_up / total)
        dn.weight.copy_(down / total)
    return Expert(gu.requires_grad_(False), dn.requires_grad_(False))


def _shrink_router_(layer: MoeLayer, keep: list[int]) -> None:
    router = layer.router
    idx = torch.tensor(keep, dtype=torch.long)
    with torch.no_grad():
        router.weight = nn.Parameter(router.weight.detach()[idx].clone(), requires_grad=False)
        if getattr(router, "bias", None) is not None:
            router.bias = nn.Parameter(router.bias.detach()[idx].clone(), requires_grad=False)
    for owner in (router, layer.block):
        for attribute in ("num_experts", "out_features"):
            if isinstance(getattr(owner, attribute, None), int):
                setattr(owner, attribute, len(keep))
        if isinstance(getattr(owner, "top_k", None), int):
            owner.top_k = min(owner.top_k, len(keep))  # type: ignore[operator]


def _shrink_experts_(layer: MoeLayer, keep: list[int], merges: list[Merge]) -> None:
    experts = layer.experts
    if isinstance(experts, RoutedExperts):
        kept = {e: experts[e] for e in keep}
        for into in {m.into for m in merges}:
            folded = [(experts[m.removed], m.removed_tokens) for m in merges if m.into == into]
            into_tokens = next(m.into_tokens for m in merges if m.into == into)
            kept[into] = merge_experts(experts[into], folded, into_tokens)
        experts.set_experts_([kept[e] for e in keep])
        return
    if merges:
        raise InputError(layer.experts_name, "merging experts needs the routed layout (sp.compress unfuses experts first)")
    if isinstance(experts, nn.ModuleList):
        setattr(layer.block, layer.family.experts, nn.ModuleList([experts[e] for e in keep]))
        return
    idx = torch.tensor(keep, dtype=torch.long)
    for name in ("gate_up_proj", "down_proj"):
        setattr(experts, name, nn.Parameter(getattr(experts, name).detach()[idx].clone(), requires_grad=False))
    experts.num_experts = len(keep)


def remove_experts_(model: nn.Module, routing: RoutingStats, prune: float, by: str = "reap", merge: bool = False,
                    seed: int = 0) -> dict[str, dict[int, int | None]]:
    """Remove (or merge away) the least useful experts of every MoE layer in place; the router, the
    config and `routing` (restricted to the kept experts) follow. Returns, per layer, each removed
    expert's original id -> the original id it was merged into (None: dropped). See the module docstring.
    """
    generator = torch.Generator().manual_seed(seed)
    removed: dict[str, dict[int, int | None]] = {}
    for layer in find_moe_layers(model):
        stats = routing.get(layer.name)
        if stats is None:
            raise InputError(layer.name, "no routing statistics for this MoE layer")
        keep = experts_to_keep(stats, prune, by, generator)
        if len(keep) == layer.num_experts:
            continue
        merges = merge_partners(stats, keep) if merge else []
        into = {m.removed: stats.kept[m.into] for m in merges}
        removed[layer.name] = {stats.kept[e]: into.get(e) for e in range(layer.num_experts) if e not in keep}
        _shrink_experts_(layer, keep, merges)
        _shrink_router_(layer, keep)
        stats.select_(keep)
    set_config_experts_(model)
    return removed

