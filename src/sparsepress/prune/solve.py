"""One-shot compression of one Linear weight: prune (magnitude | wanda | sparsegpt), quantize (rtn | gptq).

Example:
    >>> import torch
    >>> from sparsepress.recipe import PruneStage, QuantizeStage
    >>> cw = compress_weight(torch.tensor([[1.0, -2.0, 0.5, 3.0]]), None,
    ...                      prune=PruneStage(method="magnitude", pattern="2:4"),
    ...                      quant=QuantizeStage(method="rtn"))
    >>> cw.mask.tolist(), cw.bits, (cw.weight == 0).sum().item()
    ([[False, True, False, True]], 8, 2)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from ..errors import PoisonedWeightError
from ..quant.gptq import quantize_gptq
from ..quant.grid import dequantize
from ..quant.rtn import quantize_rtn
from ..recipe import PruneStage, QuantizeStage
from .admm import admm_mask
from .magnitude import score_magnitude
from .masks import MaskSpec, select_mask
from .refit import refit_kept
from .sparsegpt import FixedSelector, SweepSelector, build_sparsegpt_selector, obs_sweep
from .stats import LayerStats
from .wanda import score_wanda


@dataclass(frozen=True)
class CompressedWeight:
    """A compressed Linear weight.

    `weight`: float32 [out, in], dequantized values with exact zeros where pruned; `mask`: bool keep-mask
    (None when not pruned); `scales`: float32 [out, n_groups] (None when not quantized), with
    `weight == q * s` exactly for integers q in the grid of `bits`.

    Example:
        >>> import torch
        >>> CompressedWeight(torch.zeros(1, 2), None, None, None, None).bits is None
        True
    """

    weight: torch.Tensor
    mask: torch.Tensor | None
    scales: torch.Tensor | None
    bits: int | None
    group_size: int | None


class PrunePlan(Protocol):
    """How a prune method enters the solve: as a pruned weight, or as a selector for the GPTQ sweep."""

    dampening: float | None
    blocksize: int | None

    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def gptq_input(self, weight: torch.Tensor) -> tuple[torch.Tensor, SweepSelector]: ...


@dataclass
class FixedMaskPlan:
    """A mask chosen from scores before anything else (magnitude, wanda)."""

    keep: torch.Tensor
    dampening: float | None = None
    blocksize: int | None = None

    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        return weight * self.keep, self.keep

    def gptq_input(self, weight: torch.Tensor) -> tuple[torch.Tensor, SweepSelector]:
        # Pruned first, then GPTQ with the mask fixed: only the quantization error is compensated.
        return weight * self.keep, FixedSelector(~self.keep)


@dataclass
class SweepPlan:
    """A mask chosen inside the OBS sweep (sparsegpt), jointly with GPTQ when both are asked."""

    selector: SweepSelector
    hessian: torch.Tensor
    dampening: float
    blocksize: int

    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        result = obs_sweep(
            weight, self.hessian, dampening=self.dampening, blocksize=self.blocksize, selector=self.selector
        )
        return result.weight, ~result.pruned

    def gptq_input(self, weight: torch.Tensor) -> tuple[torch.Tensor, SweepSelector]:
        return weight, self.selector


@dataclass
class SettledMaskPlan(ABC):
    """A plan built on another (`inner`) that settles the mask before GPTQ: it keeps the inner plan's
    sweep settings (dampening, block size), and GPTQ then runs with its mask fixed and compensates only
    the rounding (a joint sweep would choose the mask while quantizing). Subclasses define `prune`.

    Example:
        >>> import torch
        >>> plan = RefitPlan(SweepPlan(None, torch.eye(2), 0.05, 64), torch.eye(2), 0.0)
        >>> plan.dampening, plan.blocksize
        (0.05, 64)
    """

    inner: PrunePlan

    @property
    def dampening(self) -> float | None:
        return self.inner.dampening

    @property
    def blocksize(self) -> int | None:
        return self.inner.blocksize

    @abstractmethod
    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]: ...

    def gptq_input(self, weight: torch.Tensor) -> tuple[torch.Tensor, SweepSelector]:
        settled, keep = self.prune(weight, None)
        return settled, FixedSelector(~keep)


@dataclass
class RefitPlan(SettledMaskPlan):
    """Another plan's mask, with the kept weights refitted by least squares (`refit_kept`) before GPTQ.

    Example:
        >>> import torch
        >>> plan = RefitPlan(FixedMaskPlan(torch.tensor([[True, False]])), torch.tensor([[2.0, 1.0], [1.0, 2.0]]), 0.0)
        >>> [round(v, 5) for v in plan.prune(torch.tensor([[1.0, 1.0]]), None)[0][0].tolist()]
        [1.5, 0.0]
    """

    hessian: torch.Tensor
    refit_dampening: float

    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        pruned, keep = self.inner.prune(weight, stats)
        return refit_kept(weight, self.hessian, keep, dampening=self.refit_dampening, start=pruned), keep


def layer_error(target: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """`tr((W - W0) H (W - W0)^T)`: how far `weight`'s outputs land from `target`'s on the calibration inputs.

    Example:
        >>> import torch
        >>> layer_error(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), torch.eye(2, dtype=torch.float64))
        4.0
    """
    gap = weight.to(torch.float64) - target.to(torch.float64)
    return float(((gap @ hessian.to(torch.float64)) * gap).sum())


@dataclass
class MaskSearchPlan(SettledMaskPlan):
    """The sweep's mask or ADMM's (`admm_mask`), whichever leaves the layer's outputs closer to the target.

    Each candidate mask is finished the same way (least-squares refit when `refit`, else the OBS sweep's
    compensation with the mask fixed) and judged by `layer_error`; SparseGPT's own mask stays a
    candidate, so the search never does worse than the sweep on the layer's objective.

    Example:
        >>> import torch
        >>> from sparsepress.prune.sparsegpt import FixedSelector
        >>> h = torch.eye(4, dtype=torch.float64)
        >>> inner = SweepPlan(FixedSelector(torch.tensor([[False, True, True, False]])), h, 0.01, 128)
        >>> plan = MaskSearchPlan(inner, MaskSpec("unstructured", 0.5), iterations=10, refit=True)
        >>> plan.prune(torch.tensor([[3.0, 2.0, -1.0, 0.5]]), None)[1].tolist()
        [[True, True, False, False]]
    """

    inner: SweepPlan
    spec: MaskSpec
    iterations: int
    refit: bool

    @property
    def hessian(self) -> torch.Tensor:
        return self.inner.hessian

    def _finish(self, weight: torch.Tensor, keep: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor:
        if self.refit:
            return refit_kept(weight, self.hessian, keep, dampening=self.inner.dampening, start=start)
        return obs_sweep(weight, self.hessian, dampening=self.inner.dampening, blocksize=self.inner.blocksize,
                         selector=FixedSelector(~keep)).weight

    def prune(self, weight: torch.Tensor, stats: LayerStats | None) -> tuple[torch.Tensor, torch.Tensor]:
        swept, swept_keep = self.inner.prune(weight, stats)
        candidates = [(self._finish(weight, swept_keep, start=swept) if self.refit else swept, swept_keep)]
        searched = admm_mask(weight, self.hessian, self.spec, iterations=self.iterations,
                             dampening=self.inner.dampening)
        candidates.append((self._finish(weight, searched), searched))
        return min(candidates, key=lambda pair: layer_error(weight, pair[0], self.hessian))


def _need_stats(stats: LayerStats | None, what: str) -> LayerStats:
    if stats is None:
        raise ValueError(f"{what} needs calibration statistics (LayerStats) of the layer's inputs")
    return stats


def _scored_planner(
    scorer: Callable[[torch.Tensor, LayerStats | None], torch.Tensor],
) -> Callable[[torch.Tensor, LayerStats | None, MaskSpec, PruneStage], PrunePlan]:
    def plan(weight: torch.Tensor, stats: LayerStats | None, spec: MaskSpec, prune: PruneStage) -> PrunePlan:
        return FixedMaskPlan(select_mask(scorer(weight, stats), spec))

    return plan


def _sparsegpt_planner(
    weight: torch.Tensor, stats: LayerStats | None, spec: MaskSpec, prune: PruneStage
) -> PrunePlan:
    hessian = _need_stats(stats, "sparsegpt").hessian
    selector = build_sparsegpt_selector(weight, hessian, spec, prune.dampening)
    return SweepPlan(selector, hessian, prune.dampening, prune.blocksize)


PRUNE_PLANNERS: dict[str, Callable[[torch.Tensor, LayerStats | None, MaskSpec, PruneStage], PrunePlan]] = {
    "magnitude": _scored_planner(score_magnitude),
    "wanda": _scored_planner(score_wanda),
    "sparsegpt": _sparsegpt_planner,
}


def _finish_unquantized(
    weight: torch.Tensor, stats: LayerStats | None, plan: PrunePlan | None, quant: QuantizeStage | None
) -> CompressedWeight:
    if plan is None:
        return CompressedWeight(weight.clone(), None, None, None, None)
    pruned, keep = plan.prune(weight, stats)
    return CompressedWeight(pruned, keep, None, None, None)


def _finish_rtn(
    weight: torch.Tensor, stats: LayerStats | None, plan: PrunePlan | None, quant: QuantizeStage
) -> CompressedWeight:
    pruned, keep = plan.prune(weight, stats) if plan is not None else (weight, None)
    q, scales = quantize_rtn(pruned, quant.bits, quant.group_size)
    values = dequantize(q, scales, quant.group_size)
    return CompressedWeight(values, keep, scales, quant.bits, quant.group_size)


def _finish_gptq(
    weight: torch.Tensor, stats: LayerStats | None, plan: PrunePlan | None, quant: QuantizeStage
) -> CompressedWeight:
    hessian = _need_stats(stats, "gptq").hessian
    start, selector = plan.gptq_input(weight) if plan is not None else (weight, None)
    dampening = plan.dampening if plan is not None else None
    blocksize = plan.blocksize if plan is not None else None
    out = quantize_gptq(start, hessian, quant, selector, dampening=dampening, blocksize=blocksize)
    return CompressedWeight(out.weight, out.keep, out.scales, quant.bits, quant.group_size)


QUANT_FINISHERS: dict[str | None, Callable[..., CompressedWeight]] = {
    None: _finish_unquantized,
    "rtn": _finish_rtn,
    "gptq": _finish_gptq,
}


def build_prune_plan(weight: torch.Tensor, stats: LayerStats | None, prune: PruneStage | None,
                     sparsity: float | None, *, refit: bool = False, mask_search: int = 0) -> PrunePlan | None:
    """How `prune` enters the solve of one weight at `sparsity` (None without a prune stage): the method's
    plan, wrapped by the ADMM mask search (sparsegpt, `mask_search` > 0) or the least-squares refit.

    Example:
        >>> import torch
        >>> from sparsepress.recipe import PruneStage
        >>> plan = build_prune_plan(torch.ones(2, 4), None, PruneStage(method="magnitude", sparsity=0.5), None)
        >>> type(plan).__name__
        'FixedMaskPlan'
    """
    if prune is None:
        return None
    spec = MaskSpec.from_stage(prune, sparsity)
    plan = PRUNE_PLANNERS[prune.method](weight, stats, spec, prune)
    if mask_search and spec.sparsity > 0 and isinstance(plan, SweepPlan):
        return MaskSearchPlan(plan, spec, mask_search, refit)
    if refit:
        return RefitPlan(plan, _need_stats(stats, "refit").hessian, prune.dampening)
    return plan


def compress_weight(
    weight: torch.Tensor,
    stats: LayerStats | None,
    prune: PruneStage | None = None,
    sparsity: float | None = None,
    quant: QuantizeStage | None = None,
    *,
    name: str | None = None,
    refit: bool = False,
    mask_search: int = 0,
    mask: torch.Tensor | None = None,
) -> CompressedWeight:
    """Prune and/or quantize one Linear weight `[out, in]` (not modified) in one shot.

    `sparsity` overrides the stage's level (required for elastic lists; ignored by N:M, which implies it).
    sparsegpt + gptq run as one OBS sweep; another prune method + gptq prunes first and then runs GPTQ
    with the mask fixed; rtn rounds the (pruned) weight. `stats` may be None only for magnitude / rtn.
    `refit` (needs `stats`): the kept weights are refitted by least squares for the chosen mask
    (`RefitPlan`), and GPTQ then quantizes them with that mask fixed. `mask_search` (sparsegpt only):
    that many ADMM iterations search a second mask, and the better of it and the sweep's is kept
    (`MaskSearchPlan`). `mask` (bool keep-mask [out, in], instead of `prune`): a mask chosen earlier
    and kept fixed (after distillation, say); the weight is zeroed off it and only quantized (GPTQ
    compensating on the kept entries), or refitted first with `refit`.

    Example:
        >>> import torch
        >>> from sparsepress.recipe import PruneStage
        >>> cw = compress_weight(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), None,
        ...                      PruneStage(method="magnitude", sparsity=0.5))
        >>> cw.weight.tolist(), cw.scales
        ([[0.0, -3.0, 2.0, 0.0]], None)
    """
    label = name or (stats.name if stats is not None else None) or "<weight>"
    if weight.dim() != 2:
        raise ValueError(f"{label}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    weight = weight.detach().float()
    if not torch.isfinite(weight).all():
        raise PoisonedWeightError(label, "weight")
    if stats is not None and stats.in_features != weight.shape[1]:
        raise ValueError(
            f"{label}: statistics are for {stats.in_features} inputs, weight has shape {tuple(weight.shape)}"
        )
    plan = None
    if mask is not None:
        if prune is not None:
            raise ValueError(f"{label}: give either a prune stage or a fixed mask, not both")
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"{label}: mask shape {tuple(mask.shape)} does not match weight {tuple(weight.shape)}")
        plan = FixedMaskPlan(mask.bool())
        if refit:
            plan = RefitPlan(plan, _need_stats(stats, "refit").hessian, quant.dampening if quant is not None else 0.01)
    else:
        plan = build_prune_plan(weight, stats, prune, sparsity, refit=refit, mask_search=mask_search)
    return QUANT_FINISHERS[quant.method if quant is not None else None](weight, stats, plan, quant)
