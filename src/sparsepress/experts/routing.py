"""Routing statistics of a MoE model on calibration data: how each layer's router uses its experts.

Per MoE layer, over the real (unpadded) calibration tokens:
- `tokens[e]`: tokens that have expert e among their top-k (frequency);
- `gate_mass[e]`: the routing weight the model gives e, summed over tokens (after top-k and any
  renormalisation: what multiplies e's output);
- `router_prob[e]`: e's softmax probability over all experts, summed over tokens;
- `reap[e]`: REAP (Lasby et al. 2025), the mean over e's tokens of gate weight x ||expert output||_2,
  the router-weighted size of what e adds to the residual stream;
- `coactivation[e, f]`: tokens routing to both e and f;
- `logit_gram` / `logit_sum`: second moments of the router logits, for expert similarity (merging);
- `top_share`: histogram of each token's largest share of its top-k mass (10 bins): how confident the
  routing is, which bounds what adaptive top-p routing can save.

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from sparsepress.calibration import make_batches
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = Qwen3MoeForCausalLM(config).eval()
    >>> stats = collect_routing(model, make_batches([torch.randint(0, 64, (12,)) for _ in range(3)], 2, 0))
    >>> sorted(stats), int(stats["model.layers.0.mlp"].tokens.sum())
    (['model.layers.0.mlp', 'model.layers.1.mlp'], 72)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models.moe import MoeLayer, find_moe_layers

TOP_SHARE_BINS = 10


@dataclass
class LayerRouting:
    """Routing statistics of one MoE layer (see the module docstring); sums over tokens.

    Example:
        >>> r = LayerRouting.empty(3, 2); r.n_tokens, r.tokens.tolist()
        (0, [0.0, 0.0, 0.0])
    """

    top_k: int
    n_tokens: int
    tokens: torch.Tensor
    gate_mass: torch.Tensor
    router_prob: torch.Tensor
    reap_sum: torch.Tensor
    coactivation: torch.Tensor
    logit_gram: torch.Tensor
    logit_sum: torch.Tensor
    top_share: torch.Tensor
    kept: list[int] = field(default_factory=list)  # original expert ids of the current experts

    @classmethod
    def empty(cls, n_experts: int, top_k: int) -> "LayerRouting":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64)  # noqa: E731
        return cls(top_k, 0, z(n_experts), z(n_experts), z(n_experts), z(n_experts), z(n_experts, n_experts),
                   z(n_experts, n_experts), z(n_experts), z(TOP_SHARE_BINS), list(range(n_experts)))

    @property
    def num_experts(self) -> int:
        return int(self.tokens.numel())

    @property
    def reap(self) -> torch.Tensor:
        """REAP score per expert (0 for experts no token reached)."""
        return self.reap_sum / self.tokens.clamp(min=1)

    @property
    def usage(self) -> torch.Tensor:
        """Each expert's share of the layer's gate mass (sums to 1; uniform before any token)."""
        total = float(self.gate_mass.sum())
        return self.gate_mass / total if total > 0 else torch.full_like(self.gate_mass, 1.0 / self.num_experts)

    def logit_similarity(self) -> torch.Tensor:
        """Correlation of the experts' router logits across tokens [E, E] (1 on the diagonal)."""
        n = max(self.n_tokens, 1)
        mean = self.logit_sum / n
        cov = self.logit_gram / n - torch.outer(mean, mean)
        std = cov.diagonal().clamp(min=1e-12).sqrt()
        return cov / torch.outer(std, std)

    def add(self, logits: torch.Tensor, weights: torch.Tensor, index: torch.Tensor,
            output_norms: torch.Tensor | None) -> None:
        """Add one batch: router logits [T, E], the routing (weights, index [T, k]) and, for REAP, each
        (token, slot)'s expert output norm [T, k]."""
        e = self.num_experts
        logits = logits.double()
        probs = torch.softmax(logits, dim=-1)
        onehot = torch.zeros(index.shape[0], e, dtype=torch.float64).scatter_(1, index, 1.0)
        self.n_tokens += int(index.shape[0])
        self.tokens += onehot.sum(dim=0)
        self.gate_mass += torch.zeros_like(onehot).scatter_(1, index, weights.double()).sum(dim=0)
        self.router_prob += probs.sum(dim=0)
        self.coactivation += onehot.T @ onehot
        self.logit_gram += logits.T @ logits
        self.logit_sum += logits.sum(dim=0)
        share = weights.double().max(dim=-1).values / weights.double().sum(dim=-1).clamp(min=1e-30)
        self.top_share += torch.histc(share.float(), bins=TOP_SHARE_BINS, min=0.0, max=1.0).double()
        if output_norms is not None:
            self.reap_sum += torch.zeros_like(onehot).scatter_add_(1, index, weights.double() * output_norms.double()).sum(dim=0)

    def select_(self, keep: list[int]) -> None:
        """Keep the statistics of experts `keep` (current indices), in that order (after removal)."""
        idx = torch.tensor(keep, dtype=torch.long)
        for name in ("tokens", "gate_mass", "router_prob", "reap_sum", "logit_sum"):
            setattr(self, name, getattr(self, name)[idx])
        for name in ("coactivation", "logit_gram"):
            setattr(self, name, getattr(self, name)[idx][:, idx])
        self.kept = [self.kept[i] for i in keep]

    def to_json(self) -> dict[str, Any]:
        """The statistics as a manifest entry (lists of floats, rounded)."""
        r = lambda t: [round(float(v), 6) for v in t.reshape(-1).tolist()]  # noqa: E731
        n = self.num_experts
        return {"top_k": self.top_k, "n_tokens": self.n_tokens, "kept": list(self.kept), "tokens": r(self.tokens),
                "gate_mass": r(self.gate_mass), "router_prob": r(self.router_prob), "reap": r(self.reap),
                "coactivation": [r(self.coactivation[i]) for i in range(n)], "top_share": r(self.top_share)}


RoutingStats = dict[str, LayerRouting]


def _output_norms(layer: MoeLayer, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """||expert output||_2 for every (token, slot) of the routing."""
    norms = torch.zeros(index.shape, dtype=torch.float64)
    for e in torch.unique(index).tolist():
        token_idx, slot = torch.where(index == e)
        norms[token_idx, slot] = layer.expert_forward(e, x[token_idx]).double().norm(dim=-1)
    return norms


def routing_hooks(model: nn.Module, stats: RoutingStats, tokens: Callable[[], torch.Tensor | None],
                  reap: bool = True) -> list[Any]:
    """Forward hooks on every MoE router that add each call's routing to `stats` (real tokens only).

    `tokens()`: the running batch's real-token mask (flattened), or None when every token is real.
    """
    handles = []
    for layer in find_moe_layers(model):
        entry = stats.setdefault(layer.name, LayerRouting.empty(layer.num_experts, layer.top_k))

        def hook(_module: nn.Module, args: tuple[Any, ...], output: Any, _layer: MoeLayer = layer,
                 _entry: LayerRouting = entry) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            logits = _layer.router_logits(output)
            real = tokens()
            if real is not None and real.numel() == logits.shape[0]:
                x, logits = x[real], logits[real]
            weights, index = _layer.route(logits)
            norms = _output_norms(_layer, x, index) if reap else None
            _entry.add(logits, weights, index, norms)

        handles.append(layer.router.register_forward_hook(hook))
    return handles


def collect_routing(model: nn.Module, batches: list[dict[str, torch.Tensor]], reap: bool = True,
                    progress: Callable[[int, int], None] | None = None) -> RoutingStats:
    """Routing statistics of every MoE layer over `batches` (one forward per batch); see the module example."""
    from ..passes.blocks import forward_kwargs, real_tokens

    stats: RoutingStats = {}
    running: list[torch.Tensor | None] = [None]
    handles = routing_hooks(model, stats, lambda: running[0], reap)
    extra = forward_kwargs(model)
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                running[0] = real_tokens(batch)
                model(**batch, **extra)
                if progress is not None:
                    progress(index + 1, len(batches))
    finally:
        for handle in handles:
            handle.remove()
    return stats
