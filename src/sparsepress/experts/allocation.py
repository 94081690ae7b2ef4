"""Per-expert sparsity allocation: hot experts keep more weights, cold ones are pruned harder.

Within each MoE layer and projection (every expert's gate_up_proj; every expert's down_proj), the
targets the allocation pass chose are redistributed around their mean by each expert's share of the
layer's gate mass u_e:  s_e = s - T log(E u_e), then shifted by one constant so the mean over the
experts (they have equal sizes) is s again, and clipped to [0, 0.99]. This is the allocation that
equalises the marginal cost of pruning when an expert's contribution to the loss is its usage times an
error that grows like exp(s / T) with its sparsity; T (`usage_temperature`) sets how strongly usage
moves sparsity (T -> 0: uniform).

Example:
    >>> import torch
    >>> from sparsepress.experts.routing import LayerRouting
    >>> r = LayerRouting.empty(2, 1); r.gate_mass += torch.tensor([3.0, 1.0])
    >>> out = allocate_by_usage({"m.experts.0.down_proj": 0.5, "m.experts.1.down_proj": 0.5},
    ...                         {"m": ("m.experts", r)}, 0.1)
    >>> [round(v, 3) for v in out.values()]
    [0.445, 0.555]
"""

from __future__ import annotations

import math

import torch

from ..prune.allocation import MAX_SPARSITY, recentre
from .routing import LayerRouting


def allocate_by_usage(sparsity: dict[str, float], layers: dict[str, tuple[str, LayerRouting]],
                      temperature: float) -> dict[str, float]:
    """`sparsity` with each MoE layer's expert matrices redistributed by usage (others unchanged).

    `layers`: MoE layer name -> (its experts module's name, its routing statistics).
    """
    out = dict(sparsity)
    for experts_name, routing in layers.values():
        usage = routing.usage.double()
        n = routing.num_experts
        for role in ("gate_up_proj", "down_proj"):
            names = [f"{experts_name}.{e}.{role}" for e in range(n)]
            if not all(name in sparsity for name in names):
                continue
            mean = sum(sparsity[name] for name in names) / n
            raw = torch.tensor([mean - temperature * math.log(max(float(u) * n, 1e-6)) for u in usage],
                               dtype=torch.float64)
            allocated = recentre(raw, torch.ones(n, dtype=torch.float64), mean, MAX_SPARSITY)
            out.update({name: float(value) for name, value in zip(names, allocated.tolist())})
    return out
