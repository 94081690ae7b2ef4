"""Per-expert calibration for the block-sequential layer solve (`sparsepress.passes.layer_solve`).

Every expert matrix is its own Linear (`RoutedExperts`, or the per-expert Linear layers of the list
layout), so the solve's input hooks already see only the tokens routed to that expert: SparseGPT's and
GPTQ's Hessians and Wanda's activation norms are per expert. This module adds what routing needs:

- **Solve order**: the experts of a layer are independent, so all their `gate_up_proj` are solved in
  one pass over the block, then all their `down_proj` (not one pass per expert matrix).
- **Padding**: padding tokens are routed to no expert while statistics are collected (routed and
  fused layouts; the list layout's block routes them itself).
- **Dense pairing**: when the solve aims at the dense model's outputs, the dense twin of the block
  replays the compressed block's routing, so each expert's inputs pair token for token.
- **Fallback for experts that see too few tokens**: an expert matrix whose routed tokens number
  fewer than `min_tokens` (default: its input width, below which its Hessian is rank-deficient) is
  topped up to `min_tokens` tokens' worth of its *all-token* statistics: the inputs it receives when
  every calibration token is sent through that expert (one extra pass over the block, cold experts
  only). An expert no token reached is calibrated on those alone. The pooled statistics are unpaired,
  so such an expert aims at its own dense weight (no dense target, no bias correction).

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from sparsepress.models.moe import unfuse_experts_
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = unfuse_experts_(Qwen3MoeForCausalLM(config))
    >>> calibration = ExpertCalibration(model)
    >>> p = "model.layers.0.mlp.experts"
    >>> calibration.solve_groups([["a"], [f"{p}.0.gate_up_proj"], [f"{p}.0.down_proj"], [f"{p}.1.gate_up_proj"],
    ...                           [f"{p}.1.down_proj"]])
    [['a'], ['model.layers.0.mlp.experts.0.gate_up_proj', 'model.layers.0.mlp.experts.1.gate_up_proj'], ['model.layers.0.mlp.experts.0.down_proj', 'model.layers.0.mlp.experts.1.down_proj']]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..models.moe import MoeLayer, find_moe_layers
from ..prune.stats import LayerStats


class LayerCalibration:
    """What a model family adds to the layer solve's statistics; this base adds nothing (dense models).

    `stops_early`: whether a statistics pass may end the block's forward once the group's layers have
    their inputs (nothing after them is read).
    """

    stops_early = True

    def solve_groups(self, groups: list[list[str]]) -> list[list[str]]:
        """The solve's groups of layers (each solved on one pass over the block), reordered or merged."""
        return groups

    @contextmanager
    def pass_over(self, block: nn.Module, dense_block: nn.Module | None) -> Iterator[Callable[[torch.Tensor | None], None]]:
        """Around one statistics pass over `block` (and its dense twin); yields a callable told each
        batch's real-token mask before the batch runs."""
        yield lambda tokens: None

    def finish(self, block: nn.Module, stats: dict[str, LayerStats], inputs: list[Any]) -> dict[str, LayerStats]:
        """The statistics of one pass, completed (e.g. pooled) before the group's layers are solved."""
        return stats


def _qualified(model: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in model.named_modules()}


class ExpertCalibration(LayerCalibration):
    """Per-expert statistics for MoE models (see the module docstring). `min_tokens`: routed tokens an
    expert matrix needs before no pooling applies (None: its input width)."""

    # The dense twin replays the routing the compressed block taped, call for call, and the cold
    # experts' pools run their own passes: every statistics pass runs the whole block.
    stops_early = False

    def __init__(self, model: nn.Module, min_tokens: int | None = None):
        self.model = model
        self.min_tokens = min_tokens
        self.experts: dict[str, tuple[str, int, str]] = {}  # matrix name -> (MoE layer, expert, role)
        for layer in find_moe_layers(model):
            for e in range(layer.num_experts):
                prefix = f"{layer.experts_name}.{e}"
                expert = model.get_submodule(prefix)
                for role, _ in _expert_matrices(expert, prefix):
                    self.experts[f"{prefix}.{role}"] = (layer.name, e, role)

    def solve_groups(self, groups: list[list[str]]) -> list[list[str]]:
        merged: dict[tuple[str, str], list[str]] = {}
        out: list[list[str]] = []
        for group in groups:
            rest = []
            for name in group:
                where = self.experts.get(name)
                if where is None:
                    rest.append(name)
                    continue
                key = (where[0], where[2])
                if key not in merged:
                    merged[key] = []
                    out.append(merged[key])
                merged[key].append(name)
            if rest:
                out.append(rest)
        return out

    def _layers_in(self, block: nn.Module) -> list[MoeLayer]:
        ids = {id(m) for m in block.modules()}
        return [layer for layer in find_moe_layers(self.model) if id(layer.block) in ids]

    @contextmanager
    def pass_over(self, block: nn.Module, dense_block: nn.Module | None) -> Iterator[Callable[[torch.Tensor | None], None]]:
        layers = self._layers_in(block)
        if not layers:
            yield lambda tokens: None
            return
        running: list[torch.Tensor | None] = [None]
        handles = []
        names = _qualified(block)
        dense_names = {name: module for name, module in dense_block.named_modules()} if dense_block is not None else {}
        for layer in layers:
            dense_router = dense_names.get(names[id(layer.router)])
            tape: deque[Any] | None = deque() if dense_router is not None else None
            handles.append(layer.router.register_forward_hook(_recording(layer, tape, running)))
            if dense_router is not None:
                handles.append(dense_router.register_forward_hook(_replaying(tape)))  # type: ignore[arg-type]
        try:
            yield lambda tokens: running.__setitem__(0, tokens)
        finally:
            for handle in handles:
                handle.remove()

    def finish(self, block: nn.Module, stats: dict[str, LayerStats], inputs: list[Any]) -> dict[str, LayerStats]:
        cold: dict[str, list[tuple[int, str]]] = {}
        for name, layer_stats in stats.items():
            where = self.experts.get(name)
            if where is None:
                continue
            needed = self.min_tokens if self.min_tokens is not None else layer_stats.in_features
            if layer_stats.n_tokens < needed:
                cold.setdefault(where[0], []).append((where[1], name))
        if not cold:
            return stats
        pools = self._all_token_stats(block, cold, stats, inputs)
        for name, pool in pools.items():
            needed = self.min_tokens if self.min_tokens is not None else stats[name].in_features
            stats[name] = stats[name].pooled(pool, needed - stats[name].n_tokens)
        return stats

    def _all_token_stats(self, block: nn.Module, cold: dict[str, list[tuple[int, str]]], stats: dict[str, LayerStats],
                         inputs: list[Any]) -> dict[str, LayerStats]:
        """Inputs of the cold expert matrices when every real calibration token goes through their expert."""
        from ..passes.blocks import run_block

        layers = {layer.name: layer for layer in self._layers_in(block) if layer.name in cold}
        pools = {name: LayerStats(stats[name].in_features, name=name) for names in cold.values() for _, name in names}
        running: list[torch.Tensor | None] = [None]

        def sink(layer: MoeLayer) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                x = (args[0] if args else kwargs["hidden_states"]).detach()
                x = x.reshape(-1, x.shape[-1])
                real = running[0]
                if real is not None and real.numel() == x.shape[0]:
                    x = x[real]
                for e, name in cold[layer.name]:
                    _through_expert(layer, e, x, {name: pools[name]})
            return hook

        handles = [layer.block.register_forward_pre_hook(sink(layer), with_kwargs=True) for layer in layers.values()]
        try:
            with torch.no_grad():
                for item in inputs:
                    running[0] = item.tokens
                    run_block(block, item)
        finally:
            for handle in handles:
                handle.remove()
        return {name: pool for name, pool in pools.items() if pool.n_tokens}


def _expert_matrices(expert: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in expert.named_modules()
            if name and (isinstance(m, nn.Linear) or type(m).__name__ == "SparseLinear")]


def _through_expert(layer: MoeLayer, e: int, x: torch.Tensor, sinks: dict[str, LayerStats]) -> None:
    """Run expert e on x, adding the inputs of its matrices named in `sinks` (by full name) to them."""
    prefix = f"{layer.experts_name}.{e}"
    expert = layer.experts[e]  # type: ignore[index]
    handles = []
    for role, module in _expert_matrices(expert, prefix):
        target = sinks.get(f"{prefix}.{role}")
        if target is not None:
            handles.append(module.register_forward_pre_hook(lambda _m, args, _t=target: _t.add(args[0])))
    try:
        layer.expert_forward(e, x)
    finally:
        for handle in handles:
            handle.remove()


def _recording(layer: MoeLayer, tape: deque[Any] | None, running: list[torch.Tensor | None]) -> Callable[..., Any]:
    """Router hook of the block being compressed: padding routes nowhere; the routing is taped."""
    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        real = running[0]
        if isinstance(output, tuple) and len(output) == 3 and real is not None:
            logits, weights, index = output
            if real.numel() == index.shape[0]:
                none = layer.num_experts
                index = torch.where(real[:, None], index, torch.full_like(index, none))
                weights = torch.where(real[:, None], weights, torch.zeros_like(weights))
                output = (logits, weights, index)
        if tape is not None:
            tape.append(output)
        return output
    return hook


def _replaying(tape: deque[Any]) -> Callable[..., Any]:
    """Router hook of the dense twin: the compressed block's routing, call for call."""
    def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        return tape.popleft() if tape else output
    return hook


def layer_calibration(model: nn.Module, min_tokens: int | None = None) -> LayerCalibration:
    """The calibration hooks `model` needs: per-expert ones for MoE models, none otherwise.

    Example:
        >>> type(layer_calibration(nn.Linear(2, 2))).__name__
        'LayerCalibration'
    """
    return ExpertCalibration(model, min_tokens) if find_moe_layers(model) else LayerCalibration()


__all__ = ["ExpertCalibration", "LayerCalibration", "layer_calibration"]
