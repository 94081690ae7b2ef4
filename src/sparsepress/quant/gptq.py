"""GPTQ (Frantar et al. 2022): quantize column by column, compensating each error with the Hessian.

Runs on the OBS sweep of `sparsepress.prune.sparsegpt`; a prune selector (fixed mask or SparseGPT's
adaptive one) makes it the joint prune + quantize solver. With `act_order` the columns are processed by
decreasing Hessian diagonal and group scales are static (computed from the weight before the sweep) so the
stored grid stays "group = column // group_size" in the original column order.

Example:
    >>> import torch
    >>> from sparsepress.recipe import QuantizeStage
    >>> out = quantize_gptq(torch.tensor([[0.3, -1.0]]), torch.eye(2), QuantizeStage(bits=4))
    >>> out.q.tolist(), out.scales.tolist()
    ([[2, -7]], [[0.1428571492433548]])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prune.sparsegpt import FixedSelector, SweepSelector, obs_sweep
from ..recipe import QuantizeStage
from .grid import compute_scales, count_groups, dequantize, round_to_grid, scales_from_absmax


@dataclass
class GridColumnQuantizer:
    """Per-column quantizer of the sweep on the shared grid.

    `group_of[c]` is the scale group of sweep column c; `group` (dynamic groups only) makes the sweep
    call `refresh` at each group start, which sets that group's scales from the current, already
    error-compensated weights (pruned ones excluded).

    Example:
        >>> import torch
        >>> qz = GridColumnQuantizer(8, torch.tensor([[0.5]]), torch.zeros(2, dtype=torch.long))
        >>> [t.tolist() for t in qz.quantize(torch.tensor([1.1]), 0)]
        [[2.0], [1.0]]
    """

    bits: int
    scales: torch.Tensor
    group_of: torch.Tensor
    group: int | None = None

    def refresh(self, column: int, block_values: torch.Tensor, block_pruned: torch.Tensor) -> None:
        if self.group is None or column % self.group:
            return
        values = block_values[:, : self.group].masked_fill(block_pruned[:, : self.group], 0.0)
        self.scales[:, column // self.group] = scales_from_absmax(values.abs().amax(dim=1), self.bits)

    def quantize(self, values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.scales[:, int(self.group_of[column])]
        q = round_to_grid(values, scale, self.bits)
        return q, q * scale


@dataclass
class GptqResult:
    """Grid integers (int8 [out, in]), scales (float32 [out, n_groups]), dequantized weight, keep-mask."""

    q: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor
    keep: torch.Tensor | None


def _build_quantizer(
    weight: torch.Tensor, pruned: torch.Tensor | None, quant: QuantizeStage, order: torch.Tensor | None
) -> GridColumnQuantizer:
    cols = weight.shape[1]
    known = weight if pruned is None else weight.masked_fill(pruned, 0.0)
    group_size = quant.group_size
    if group_size is None:
        scales = compute_scales(known, quant.bits, None)
        return GridColumnQuantizer(quant.bits, scales, torch.zeros(cols, dtype=torch.long))
    if order is not None:
        scales = compute_scales(known, quant.bits, group_size)
        return GridColumnQuantizer(quant.bits, scales, order // group_size)
    scales = torch.ones(weight.shape[0], count_groups(cols, group_size))
    return GridColumnQuantizer(quant.bits, scales, torch.arange(cols) // group_size, group=group_size)


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    quant: QuantizeStage,
    selector: SweepSelector | None = None,
    *,
    dampening: float | None = None,
    blocksize: int | None = None,
) -> GptqResult:
    """GPTQ-quantize `weight [out, in]` with Hessian `hessian [in, in]`, optionally pruning via `selector`.

    `dampening` / `blocksize` default to the stage's. act_order applies without a selector or with a
    mask fixed before the sweep; an adaptive selector (SparseGPT unstructured, N:M, bbs) keeps the
    natural column order, as in the SparseGPT paper (N:M and bbs groups are contiguous inputs anyway).

    Example:
        >>> import torch
        >>> from sparsepress.recipe import QuantizeStage
        >>> out = quantize_gptq(torch.tensor([[0.3, -1.0]]), torch.eye(2), QuantizeStage(bits=8),
        ...                     FixedSelector(torch.tensor([[True, False]])))
        >>> out.q.tolist(), out.keep.tolist()
        ([[0, -127]], [[False, True]])
    """
    weight = weight.detach().float()
    hessian = hessian.detach().to(torch.float64)
    fixed = selector.pruned if isinstance(selector, FixedSelector) else None
    order = torch.argsort(hessian.diagonal(), descending=True, stable=True) if quant.act_order else None
    if order is not None and selector is not None:
        permuted = selector.permuted(order)
        order = order if permuted is not None else None
        selector = permuted if permuted is not None else selector
    quantizer = _build_quantizer(weight, fixed, quant, order)
    result = obs_sweep(
        weight,
        hessian,
        dampening=quant.dampening if dampening is None else dampening,
        blocksize=quant.blocksize if blocksize is None else blocksize,
        selector=selector,
        quantizer=quantizer,
        order=order,
    )
    q, pruned = result.q, result.pruned
    assert q is not None
    q = q.to(torch.int8)
    keep = ~pruned if selector is not None else None
    return GptqResult(q, quantizer.scales, dequantize(q, quantizer.scales, quant.group_size), keep)
