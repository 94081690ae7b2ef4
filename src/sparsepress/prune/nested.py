"""Nested elastic levels of one Linear weight: one set of values, one keep-mask per level, each inside the last.

The lowest level is solved like a single-level weight (the method's mask, the ADMM search, the
least-squares refit). Each higher level then prunes further inside the previous level's support, by the
method's own importance: magnitude |w|, Wanda |w| * ||x||, or SparseGPT's OBS sweep restricted to that
support (its compensated weights guide the next level's choice). Levels share their stored values, so
compensation is joint: the values minimise the sum over levels of each level's relative output error,

    sum_i  ||X (W* - M_i . V)||^2 / E_i,      E_i = level i's error with its own least-squares refit,

(conjugate gradients over all rows at once, like `refit.refit_kept`), then each level gets one gain per
output row (its least-squares scale; stored beside the scales of integer dtypes, free at run time).
Quantization (RTN or GPTQ with the lowest level's mask fixed) comes last.

Example:
    >>> import torch
    >>> from sparsepress.recipe import PruneStage
    >>> w = torch.tensor([[4.0, -3.0, 2.0, 1.0], [1.0, 2.0, -3.0, 4.0]])
    >>> nested = compress_nested(w, None, PruneStage(method="magnitude", sparsity=[0.25, 0.5]), [0.25, 0.5])
    >>> [k.sum(dim=1).tolist() for k in nested.keeps], bool((nested.keeps[1] <= nested.keeps[0]).all())
    ([[3, 3], [2, 2]], True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import PoisonedWeightError
from ..quant.gptq import quantize_gptq
from ..quant.grid import dequantize
from ..quant.rtn import quantize_rtn
from ..recipe import PruneStage, QuantizeStage
from .magnitude import score_magnitude
from .masks import MaskSpec, select_mask
from .refit import damped, refit_kept
from .solve import build_prune_plan, layer_error
from .sparsegpt import FixedSelector, SweepSelector, build_sparsegpt_selector, obs_sweep
from .stats import LayerStats
from .wanda import score_wanda

# How much each level's relative error counts in the joint fit of the shared values (lowest level first;
# the last entry repeats for further levels).
LEVEL_WEIGHTS = (1.0,)
# Conjugate-gradient steps of the joint fit (each: one [out, in] x [in, in] product per level).
JOINT_ITERATIONS = 30
# Row gains are least-squares scales; clamped so a near-empty row cannot blow up.
GAIN_RANGE = (0.25, 4.0)


@dataclass(frozen=True)
class NestedWeight:
    """A weight with nested levels.

    `weight`: float32 [out, in], the values every level shares (dequantized; zero outside `keeps[0]`);
    `keeps`: bool keep-masks, lowest sparsity first, each inside the one before; `gains`: float32
    [L, out], level i's weight is `gains[i, r] * weight[r] * keeps[i][r]`; `scales` / `bits` /
    `group_size` as in `CompressedWeight`.

    Example:
        >>> w = torch.tensor([[2.0, 1.0]])
        >>> n = NestedWeight(w, (w != 0, w > 1), torch.tensor([[1.0], [0.5]]), None, None, None)
        >>> n.level_weight(1).tolist()
        [[1.0, 0.0]]
    """

    weight: torch.Tensor
    keeps: tuple[torch.Tensor, ...]
    gains: torch.Tensor
    scales: torch.Tensor | None
    bits: int | None
    group_size: int | None

    def level_weight(self, level: int) -> torch.Tensor:
        """float32 [out, in] weight of level `level` (index, 0 = lowest sparsity)."""
        return self.weight * self.keeps[level] * self.gains[level].unsqueeze(1)


@dataclass
class SupportSelector:
    """A SparseGPT selector that may only keep weights inside `support` (True = may keep).

    Columns outside the support score -inf, so the inner selector prunes them first and spends the rest
    of its budget on the lowest OBS scores inside.

    Example:
        >>> from sparsepress.prune.sparsegpt import RowLookaheadSelector
        >>> sel = SupportSelector(RowLookaheadSelector(2), torch.tensor([[True, False, True]]))
        >>> sel.choose(torch.tensor([[1.0, 5.0, 2.0]]), 0, 3, torch.zeros(1, 3, dtype=torch.bool)).tolist()
        [[True, True, False]]
    """

    inner: SweepSelector
    support: torch.Tensor

    @property
    def group(self) -> int | None:
        return self.inner.group

    def choose(self, scores: torch.Tensor, start: int, stop: int, pruned: torch.Tensor) -> torch.Tensor:
        outside = ~self.support[:, start:start + scores.shape[1]]
        chosen = self.inner.choose(scores.masked_fill(outside, float("-inf")), start, stop, pruned)
        return chosen | outside[:, : stop - start]

    def permuted(self, order: torch.Tensor) -> None:
        return None


NestStep = Callable[[torch.Tensor, torch.Tensor, "LayerStats | None", MaskSpec, PruneStage],
                    tuple[torch.Tensor, torch.Tensor]]


def _scored_step(scorer: Callable[[torch.Tensor, LayerStats | None], torch.Tensor]) -> NestStep:
    def step(current: torch.Tensor, support: torch.Tensor, stats: LayerStats | None, spec: MaskSpec,
             prune: PruneStage) -> tuple[torch.Tensor, torch.Tensor]:
        scores = scorer(current, stats).float().masked_fill(~support, float("-inf"))
        keep = select_mask(scores, spec) & support
        return keep, current * keep

    return step


def _sparsegpt_step(current: torch.Tensor, support: torch.Tensor, stats: LayerStats | None, spec: MaskSpec,
                    prune: PruneStage) -> tuple[torch.Tensor, torch.Tensor]:
    if stats is None:
        raise ValueError("sparsegpt needs calibration statistics (LayerStats) of the layer's inputs")
    hessian = stats.hessian
    selector = SupportSelector(build_sparsegpt_selector(current, hessian, spec, prune.dampening), support)
    result = obs_sweep(current, hessian, dampening=prune.dampening, blocksize=prune.blocksize, selector=selector)
    keep = ~result.pruned & support
    return keep, result.weight * keep


# Methods whose nesting step compensates the weights it keeps (their level weights are near-optimal).
COMPENSATING = ("sparsegpt",)

NEST_STEPS: dict[str, NestStep] = {
    "magnitude": _scored_step(score_magnitude),
    "wanda": _scored_step(score_wanda),
    "sparsegpt": _sparsegpt_step,
}


def nested_keeps(first: torch.Tensor, keep: torch.Tensor, stats: LayerStats | None, prune: PruneStage,
                 levels: Sequence[float]) -> list[torch.Tensor]:
    """Keep-masks of every level: `keep` (the lowest level's, for weight `first`), then each higher level
    chosen inside the one before by the method's importance (see the module docstring).

    Example:
        >>> w = torch.tensor([[4.0, -3.0, 2.0, 0.0]])
        >>> [k.tolist() for k in nested_keeps(w, w != 0, None, PruneStage(method="magnitude", sparsity=[0.25, 0.75]), [0.25, 0.75])]
        [[[True, True, True, False]], [[True, False, False, False]]]
    """
    return nested_levels(first, keep, stats, prune, levels)[0]


def nested_levels(first: torch.Tensor, keep: torch.Tensor, stats: LayerStats | None, prune: PruneStage,
                  levels: Sequence[float]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`nested_keeps`, and each level's weight as the nesting step left it (SparseGPT: compensated)."""
    keeps = [keep.bool()]
    weights = [first * keeps[0]]
    for sparsity in levels[1:]:
        spec = MaskSpec.from_stage(prune, sparsity)
        level_keep, current = NEST_STEPS[prune.method](weights[-1], keeps[-1], stats, spec, prune)
        keeps.append(level_keep)
        weights.append(current)
    return keeps, weights


def _weights_for(levels: int) -> list[float]:
    return [LEVEL_WEIGHTS[min(i, len(LEVEL_WEIGHTS) - 1)] for i in range(levels)]


def fit_shared_values(target: torch.Tensor, hessian: torch.Tensor, keeps: Sequence[torch.Tensor],
                      weights: Sequence[float], *, dampening: float = 0.01,
                      start: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [out, in], zero outside keeps[0]: the values minimising sum_i weights[i] ||X (target - keeps[i] . V)||^2.

    Preconditioned conjugate gradients on all rows at once (Jacobi, like `refit.refit_kept`).

    Example:
        >>> keeps = [torch.tensor([[True, True]]), torch.tensor([[True, False]])]
        >>> v = fit_shared_values(torch.tensor([[1.0, 1.0]]), torch.eye(2), keeps, [1.0, 1.0], dampening=0.0)
        >>> [round(x, 4) for x in v[0].tolist()]
        [1.0, 1.0]
    """
    live = (hessian.diagonal() != 0).unsqueeze(0)
    masks = [(k.bool() & live).float() for k in keeps]
    work = damped(hessian, dampening)
    scale = work.diagonal().clamp(min=1e-300).rsqrt()
    unit = (work * scale.unsqueeze(1) * scale.unsqueeze(0)).float()
    rhs_base = ((target.double() @ work) * scale).float()
    rhs = sum(w * m * rhs_base for w, m in zip(weights, masks))
    precond = sum(w * m for w, m in zip(weights, masks)).clamp(min=1e-30)

    def apply(d: torch.Tensor) -> torch.Tensor:
        return sum(w * m * ((m * d) @ unit) for w, m in zip(weights, masks))

    seed = (start if start is not None else target * keeps[0]).double()
    y = ((seed / scale).float()) * masks[0]
    residual = (rhs - apply(y)) * masks[0]
    z = residual / precond
    direction = z.clone()
    rz = (residual.double() * z.double()).sum(dim=1)
    for _ in range(JOINT_ITERATIONS):
        product = apply(direction) * masks[0]
        step = (rz / (direction.double() * product.double()).sum(dim=1).clamp(min=1e-300)).float()
        y += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * product
        z = residual / precond
        rz_next = (residual.double() * z.double()).sum(dim=1)
        direction = z + (rz_next / rz.clamp(min=1e-300)).float().unsqueeze(1) * direction
        rz = rz_next
    return ((y.double() * scale).float()) * masks[0]


def row_gains(target: torch.Tensor, hessian: torch.Tensor, weight: torch.Tensor,
              keeps: Sequence[torch.Tensor]) -> torch.Tensor:
    """float32 [L, out]: per level and row, the scale g minimising ||X (target_r - g (keeps[i] . weight)_r)||^2.

    Example:
        >>> keeps = [torch.tensor([[True, True]])]
        >>> row_gains(torch.tensor([[2.0, 2.0]]), torch.eye(2), torch.tensor([[1.0, 1.0]]), keeps).tolist()
        [[2.0]]
    """
    h = hessian.double()
    goal = target.double() @ h
    gains = []
    for keep in keeps:
        v = (weight * keep).double()
        num, den = (goal * v).sum(dim=1), ((v @ h) * v).sum(dim=1)
        gain = torch.where(den > 0, num / den.clamp(min=1e-300), torch.ones_like(den))
        gains.append(gain.clamp(*GAIN_RANGE).float())
    return torch.stack(gains)


def _quantize(values: torch.Tensor, keep: torch.Tensor, stats: LayerStats | None, quant: QuantizeStage | None,
              dampening: float, blocksize: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if quant is None:
        return values, None
    if quant.method == "gptq":
        if stats is None:
            raise ValueError("gptq needs calibration statistics (LayerStats) of the layer's inputs")
        out = quantize_gptq(values, stats.hessian, quant, FixedSelector(~keep), dampening=dampening, blocksize=blocksize)
        return out.weight, out.scales
    q, scales = quantize_rtn(values, quant.bits, quant.group_size)
    return dequantize(q, scales, quant.group_size), scales


def compress_nested(weight: torch.Tensor, stats: LayerStats | None, prune: PruneStage, levels: Sequence[float],
                    quant: QuantizeStage | None = None, *, name: str | None = None, refit: bool = False,
                    mask_search: int = 0) -> NestedWeight:
    """Nested levels of `weight [out, in]` (not modified) at the increasing sparsities `levels`.

    `refit` (needs `stats`): the shared values are fitted jointly for every level and each level gets
    row gains; without it they are the lowest level's values, every level a mask over them.
    `mask_search`: as in `compress_weight`, for the lowest level. See the module example.
    """
    label = name or (stats.name if stats is not None else None) or "<weight>"
    weight = weight.detach().float()
    if not torch.isfinite(weight).all():
        raise PoisonedWeightError(label, "weight")
    if len(levels) < 2:
        raise ValueError(f"{label}: nested levels need at least two sparsities, got {list(levels)}")
    plan = build_prune_plan(weight, stats, prune, levels[0], refit=refit, mask_search=mask_search)
    assert plan is not None
    first, keep = plan.prune(weight, stats)
    keeps, swept = nested_levels(first, keep, stats, prune, levels)
    values = first
    if refit and stats is not None:
        hessian = stats.hessian
        # each level's own best error: the OBS sweep's compensated weight approximates its refit closely
        # (and costs nothing more); the scored methods' masked weights need the refit
        own = swept if prune.method in COMPENSATING else [
            first if i == 0 else refit_kept(weight, hessian, k, dampening=prune.dampening) for i, k in enumerate(keeps)]
        errors = [layer_error(weight, w, hessian) for w in own]
        weights = [w / max(e, 1e-30) for w, e in zip(_weights_for(len(keeps)), errors)]
        values = fit_shared_values(weight, hessian, keeps, weights, dampening=prune.dampening, start=first)
    dampening = plan.dampening if plan.dampening is not None else prune.dampening
    blocksize = plan.blocksize if plan.blocksize is not None else prune.blocksize
    values, scales = _quantize(values * keeps[0], keeps[0], stats, quant, dampening, blocksize)
    values = values * keeps[0]
    if stats is not None and quant is not None:
        gains = row_gains(weight, stats.hessian, values, keeps)
    else:
        gains = torch.ones(len(keeps), weight.shape[0])
    return NestedWeight(values, tuple(keeps), gains, scales, quant.bits if quant else None,
                        quant.group_size if quant else None)
