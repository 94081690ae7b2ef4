"""Adaptive routing: confidence-based top-k (top-p), switchable at run time, offered as operating points.

`set_routing(model, top_p)` makes every MoE layer evaluate, per token, the fewest of its top-k experts
whose share of the token's top-k gate mass reaches `top_p` (`None` or 1: plain top-k); confident tokens
then use fewer experts. `calibrate_routing` measures, on calibration batches, the loss (next-token
negative log-likelihood for causal LMs, else the mean squared deviation of the final hidden states
from plain top-k's) and the experts evaluated per token at a ladder of top_p values;
`choose_top_p` picks the lowest whose relative loss rise stays within a quality floor. The points within
the floor are the model's routing operating points: the runtime controller
(`sparsepress.adaptive.AdaptiveController`) sees them through the registered knob `"top_p"`.

Example:
    >>> import torch
    >>> from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    >>> from sparsepress.calibration import make_batches
    >>> from sparsepress.models.moe import unfuse_experts_
    >>> config = Qwen3MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
    ...                         num_experts=4, num_experts_per_tok=2, num_hidden_layers=1, norm_topk_prob=True,
    ...                         num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    >>> model = unfuse_experts_(Qwen3MoeForCausalLM(config).eval())
    >>> points = calibrate_routing(model, make_batches([torch.randint(0, 64, (16,))], 1, 0), ladder=(1.0, 0.5))
    >>> [(p.top_p, p.experts_per_token) for p in points]
    [(1.0, 2.0), (0.5, 1.0)]
    >>> set_routing(model, 0.5); routing_top_p(model)
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..adaptive import Knob, register_knob
from ..errors import InputError
from ..nn.experts import ExpertCounts, RoutedExperts

TOP_P_LADDER = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def routed_experts(model: nn.Module) -> list[RoutedExperts]:
    """Every RoutedExperts module of `model` (empty for dense models and fused, unconverted ones).

    Example:
        >>> routed_experts(nn.Linear(2, 2))
        []
    """
    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def set_routing(model: nn.Module, top_p: float | None = None) -> None:
    """Switch every MoE layer of `model` to top-p routing (`None` or 1: plain top-k) for the next calls.

    The value is read once per layer and forward, so a call in flight sees one setting per layer.
    InputError when the model has no routed MoE layers (load it with sp.load, or compress it first).

    Example:
        >>> set_routing(nn.Linear(2, 2), 0.8)
        Traceback (most recent call last):
        ...
        sparsepress.errors.InputError: Linear: no mixture-of-experts layers to route (sp.load or sp.compress a MoE model first)
    """
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InputError("top_p", f"must be in (0, 1] or None, got {top_p}")
    layers = routed_experts(model)
    if not layers:
        raise InputError(type(model).__name__, "no mixture-of-experts layers to route (sp.load or sp.compress a MoE model first)")
    for experts in layers:
        experts.top_p = None if top_p is None or top_p >= 1.0 else float(top_p)


def routing_top_p(model: nn.Module) -> float | None:
    """The top_p the model's MoE layers route with now (None: plain top-k)."""
    values = {experts.top_p for experts in routed_experts(model)}
    return values.pop() if len(values) == 1 else None


def expert_counts(model: nn.Module, reset: bool = False) -> ExpertCounts:
    """Tokens, expert evaluations and packed bytes read, summed over the MoE layers (`reset`: then zero them).

    `tokens` counts each token once per MoE layer, so `per_token` is the mean experts per token and layer.

    Example:
        >>> expert_counts(nn.Linear(2, 2)).per_token
        0.0
    """
    total = ExpertCounts()
    for experts in routed_experts(model):
        total.tokens += experts.counts.tokens
        total.evaluations += experts.counts.evaluations
        total.bytes_read += experts.counts.bytes_read
        if reset:
            experts.counts.reset()
    return total


@dataclass(frozen=True)
class RoutingPoint:
    """One measured top_p: experts per token and layer, calibration loss, its rise over plain top-k."""

    top_p: float
    experts_per_token: float
    loss: float
    loss_rise: float

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def _loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], reference: list[torch.Tensor] | None) -> tuple[float, list[torch.Tensor]]:
    """Mean next-token NLL (causal LMs) or mean squared deviation from `reference` hidden states."""
    from ..evaluate import is_causal_lm
    from ..passes.blocks import forward_kwargs

    extra = forward_kwargs(model)
    causal = is_causal_lm(model)
    total, count, hidden = 0.0, 0, []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            out = model(**batch, **extra, **({} if causal else {"output_hidden_states": True}))
            mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            if causal:
                logits = out.logits.float()
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
                valid = mask[:, 1:]
                total += float(nll[valid].sum())
                count += int(valid.sum())
            else:
                last = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out[0]
                hidden.append(last)
                if reference is not None:
                    total += float(((last - reference[i]) ** 2)[mask].sum())
                    count += int(mask.sum()) * last.shape[-1]
    return total / max(count, 1), hidden


def calibrate_routing(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                      ladder: Sequence[float] = TOP_P_LADDER) -> list[RoutingPoint]:
    """Loss and experts per token at each top_p of `ladder` (1.0 first: the reference); the model's
    routing is restored afterwards. See the module example."""
    before = routing_top_p(model)
    points: list[RoutingPoint] = []
    base_loss, reference = None, None
    try:
        for top_p in sorted(set(ladder), reverse=True):
            set_routing(model, top_p)
            expert_counts(model, reset=True)
            loss, hidden = _loss(model, batches, reference)
            if base_loss is None:
                base_loss, reference = loss, (hidden or None)
                if reference is not None:  # the reference's own deviation is 0 by definition
                    loss = 0.0
                    base_loss = float(torch.cat([h.reshape(-1) for h in hidden]).pow(2).mean())
            counts = expert_counts(model, reset=True)
            rise = (loss - base_loss) / base_loss if base_loss else 0.0
            points.append(RoutingPoint(float(top_p), counts.per_token, loss, rise if top_p < 1.0 else 0.0))
    finally:
        set_routing(model, before)
    return points


def choose_top_p(points: Sequence[RoutingPoint], max_loss_rise: float) -> float:
    """The lowest measured top_p whose loss rise is within `max_loss_rise` (1.0 when none is).

    Example:
        >>> pts = [RoutingPoint(1.0, 2.0, 3.0, 0.0), RoutingPoint(0.8, 1.5, 3.03, 0.01), RoutingPoint(0.6, 1.2, 3.3, 0.1)]
        >>> choose_top_p(pts, 0.02)
        0.8
    """
    within = [p.top_p for p in points if p.loss_rise <= max_loss_rise]
    return min(within) if within else 1.0


def operating_levels(model: nn.Module) -> list[float]:
    """The top_p levels offered to the runtime controller: those calibrated within the quality floor
    (stored on the model by sp.compress / sp.load as `sparsepress_routing_points`), plain top-k first.

    Example:
        >>> operating_levels(nn.Linear(2, 2))
        []
    """
    return list(getattr(model, "sparsepress_routing_levels", []) or [])


TOP_P_KNOB = register_knob(Knob("top_p", levels=operating_levels, apply=set_routing))
