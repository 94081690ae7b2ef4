"""SparseGPT (Frantar & Alistarh 2023): OBS pruning with a lazy-batched column sweep.

The same sweep also runs GPTQ (a per-column quantizer) and joint prune + quantize: each column is
pruned or quantized and its error is compensated on the columns still to come.

Example:
    >>> import torch
    >>> from sparsepress.prune.masks import MaskSpec
    >>> from sparsepress.prune.stats import LayerStats
    >>> stats = LayerStats(8); stats.add(torch.randn(64, 8, generator=torch.Generator().manual_seed(0)))
    >>> w, keep = prune_sparsegpt(torch.ones(2, 8), stats.hessian, MaskSpec("nm", 0.5, n=2, m=4))
    >>> keep.sum(dim=1).tolist(), bool((w[~keep] == 0).all())
    ([4, 4], True)
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from .masks import MaskSpec, count_kept, count_pruned, keep_top, prune_lowest_per_row, select_mask


def repair_dead_inputs(hessian: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian (float64) with H_jj = 1 and weight with W[:, j] = 0 for inputs never active (H_jj == 0).

    Example:
        >>> import torch
        >>> h, w = repair_dead_inputs(torch.diag(torch.tensor([2.0, 0.0])), torch.ones(1, 2))
        >>> h.diagonal().tolist(), w.tolist()
        ([2.0, 1.0], [[1.0, 0.0]])
    """
    hessian = hessian.detach().to(torch.float64).clone()
    weight = weight.detach().float().clone()
    dead = hessian.diagonal() == 0
    hessian.diagonal()[dead] = 1.0
    weight[:, dead] = 0.0
    return hessian, weight


def _damped_copy(hessian: torch.Tensor, damp: float, *, reversed_: bool = False) -> torch.Tensor:
    work = (hessian.flip(0, 1) if reversed_ else hessian).to(torch.float64, copy=True)
    work.diagonal().add_(damp)  # the reversal keeps the diagonal on the diagonal
    return work


def diagonal_mean(values: torch.Tensor) -> float:
    """Mean of a float64 vector summed as torch sums a matrix diagonal (a strided view).

    torch reduces a strided vector in another order than a contiguous one, so a diagonal gathered in
    another column order (or repaired) gives the very bits of its permuted matrix's `diagonal().mean()`
    only when summed strided too; every stride but 1 sums alike.

    Example:
        >>> h = torch.rand(50, 50, dtype=torch.float64)
        >>> diagonal_mean(h.diagonal().clone()) == float(h.diagonal().mean())
        True
    """
    strided = torch.empty(2 * values.numel(), dtype=torch.float64)[::2]
    strided.copy_(values)
    return float(strided.mean())


def _reversed_work(hessian: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    # H in the sweep's order, reversed, as one new float64 tensor in column-major layout (the layout
    # torch's out-of-place Cholesky writes: the factor made in place of it then has the same bits).
    # One gather from the transpose (it writes row-major, so its transpose is the column-major copy;
    # flip would keep the input's layout).
    index = torch.arange(hessian.shape[0] - 1, -1, -1) if order is None else order.flip(0)
    work = hessian.t()[index.unsqueeze(1), index.unsqueeze(0)]
    return (work if work.dtype == torch.float64 else work.to(torch.float64)).t()


def _upper_inverse_factor(hessian: torch.Tensor, damp: float, order: torch.Tensor | None = None,
                          dtype: torch.dtype = torch.float64, repair_dead: bool = False) -> tuple[torch.Tensor, int]:
    # U with U^T U = A^-1 from one Cholesky and one triangular inverse: with J the reversal, J A J = M M^T
    # gives A = (J M J)(J M J)^T with J M J upper, so U = (J M J)^-1 = J M^-1 J. cholesky_inverse and a
    # second Cholesky (the reference) cost 20x more on MKL for a 1536-wide layer (3.5 s against 0.2).
    # Two [in, in] float64 at most: the Cholesky overwrites its copy of H and the triangular solve its
    # identity (column-major, the layout LAPACK writes, so the bits are those of the out-of-place calls).
    work = _reversed_work(hessian, order)
    if repair_dead:
        work.diagonal().masked_fill_(work.diagonal() == 0, 1.0)
    work.diagonal().add_(damp)
    info = torch.empty((), dtype=torch.int32)
    torch.linalg.cholesky_ex(work, out=(work, info))
    if int(info) != 0:
        return work, int(info)
    inverse = torch.eye(work.shape[0], dtype=work.dtype).t()
    torch.linalg.solve_triangular(work, inverse, upper=False, out=inverse)
    del work
    return inverse.to(dtype).flip(0, 1), 0


def _upper_inverse_factor_reference(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, int]:
    lower, info = torch.linalg.cholesky_ex(_damped_copy(hessian, damp))
    if int(info) != 0:
        return lower, int(info)
    inverse = torch.cholesky_inverse(lower)
    del lower
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    return upper, int(info)


def inverse_hessian_cholesky(hessian: torch.Tensor, dampening: float, *, reference: bool = False,
                             order: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                             repair_dead: bool = False) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, in float64 (or `dtype`).

    Row j of U is the inverse Hessian of the columns j.. (still to process) scaled by 1/sqrt of its
    diagonal, which is what the OBS update of column j needs. Dampening grows x10 until H is positive
    definite. `repair_dead`: inputs never active (H_jj == 0) count as H_jj = 1 (`repair_dead_inputs`,
    without its copy of H). `order`: the factor of H with rows and columns in that order
    (`H[order][:, order]`, without that copy).
    `reference`: the textbook route (Cholesky, its inverse, the inverse's Cholesky), which the default
    one-factorisation route equals up to rounding.

    Example:
        >>> import torch
        >>> inverse_hessian_cholesky(torch.eye(2) * 4, 0.0).diagonal().tolist()
        [0.5, 0.5]
    """
    # One working copy, damped on its diagonal in place, and each factor freed as soon as the next
    # exists: the Hessian of a wide layer (11008 inputs: ~1 GB in float64) must not be held 5 times.
    if reference:
        hessian = hessian if order is None else hessian[order][:, order]
        if repair_dead:
            hessian = repair_dead_inputs(hessian, torch.zeros(0, hessian.shape[1]))[0]
        order, repair_dead, factor = None, False, _upper_inverse_factor_reference
    else:
        factor = functools.partial(_upper_inverse_factor, order=order, dtype=dtype, repair_dead=repair_dead)
    diagonal = (hessian.diagonal() if order is None else hessian.diagonal()[order]).to(torch.float64)
    mean_diag = diagonal_mean(diagonal.masked_fill(diagonal == 0, 1.0) if repair_dead else diagonal)
    damp = dampening * mean_diag if mean_diag > 0 else dampening
    for _ in range(6):
        upper, info = factor(hessian, damp)
        if info == 0:
            return upper.to(dtype)
        damp = max(damp * 10.0, 1e-8)
    raise ValueError("the calibration Hessian is not positive definite even with strong dampening")


class SweepSelector(Protocol):
    """Chooses which columns to prune while the sweep runs (True = pruned).

    `group` None: `choose` is called at each sweep block with the OBS scores of every column not yet
    processed; otherwise at each `group`-aligned column with the scores of that group only.
    """

    group: int | None

    def choose(self, scores: torch.Tensor, start: int, stop: int, pruned: torch.Tensor) -> torch.Tensor: ...

    def permuted(self, order: torch.Tensor) -> "SweepSelector | None": ...


@dataclass
class FixedSelector:
    """A prune-mask decided before the sweep.

    Example:
        >>> import torch
        >>> FixedSelector(torch.tensor([[True, False]])).choose(torch.zeros(1, 2), 1, 2, None).tolist()
        [[False]]
    """

    pruned: torch.Tensor
    group: int | None = None

    def choose(self, scores: torch.Tensor, start: int, stop: int, pruned: torch.Tensor) -> torch.Tensor:
        return self.pruned[:, start:stop]

    def permuted(self, order: torch.Tensor) -> "FixedSelector":
        return FixedSelector(self.pruned[:, order])


@dataclass
class RowLookaheadSelector:
    """Unstructured, per output row: exactly `target` pruned per row, picked adaptively per block.

    At each block the lowest current OBS scores among all unprocessed columns are chosen for the row's
    remaining budget; only the block's share is committed, so later blocks see updated weights.

    Example:
        >>> import torch
        >>> none_yet = torch.zeros(1, 3, dtype=torch.bool)
        >>> RowLookaheadSelector(1).choose(torch.tensor([[3.0, 2.0, 1.0]]), 0, 2, none_yet).tolist()
        [[False, False]]
    """

    target: int
    group: int | None = None

    def choose(self, scores: torch.Tensor, start: int, stop: int, pruned: torch.Tensor) -> torch.Tensor:
        remaining = self.target - pruned[:, :start].sum(dim=1)
        return prune_lowest_per_row(scores, remaining)[:, : stop - start]

    def permuted(self, order: torch.Tensor) -> None:
        # Measured: SparseGPT's adaptive selection in act_order (largest H_jj first) prunes worse than in
        # natural order, and pruning error dominates the joint error, so the sweep keeps natural order.
        return None


@dataclass
class GroupSelector:
    """N:M or bbs: at each group of `group` columns keep the `keep(width)` best current scores per row.

    Example:
        >>> import torch
        >>> scores = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
        >>> GroupSelector(4, lambda width: 2).choose(scores, 0, 4, None).tolist()
        [[True, False, False, True]]
    """

    group: int
    keep: Callable[[int], int]

    def choose(self, scores: torch.Tensor, start: int, stop: int, pruned: torch.Tensor) -> torch.Tensor:
        return ~keep_top(scores, self.keep(stop - start))

    def permuted(self, order: torch.Tensor) -> None:
        return None  # groups are contiguous input ranges: a column permutation would break them


class ColumnQuantizer(Protocol):
    """Quantizes one column of the sweep (GPTQ); see `sparsepress.quant.gptq.GridColumnQuantizer`."""

    group: int | None

    def refresh(self, column: int, block_values: torch.Tensor, block_pruned: torch.Tensor) -> None: ...

    def quantize(self, values: torch.Tensor, column: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class SweepResult:
    """Sweep output: updated weight (exact zeros where pruned), prune-mask, grid integers or None."""

    weight: torch.Tensor
    pruned: torch.Tensor
    q: torch.Tensor | None


def _aligned_blocksize(blocksize: int, *groups: int | None) -> int:
    align = 1
    for group in groups:
        if group:
            align = align * group // math.gcd(align, group)
    return math.ceil(blocksize / align) * align


def obs_sweep(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    dampening: float,
    blocksize: int,
    selector: SweepSelector | None = None,
    quantizer: ColumnQuantizer | None = None,
    order: torch.Tensor | None = None,
) -> SweepResult:
    """Process columns left to right: prune / quantize each and compensate its error (OBS) on the rest.

    Blocks are widened to a multiple of the selector's and quantizer's groups so a group never
    straddles the lazy-update boundary. `order` (a permutation of the columns): sweep them in that
    order instead (GPTQ's act_order), as if `weight[:, order]` with `hessian[order][:, order]` were swept,
    without that permuted copy of H; the selector and quantizer see sweep positions, the results are
    in the original column order. Inputs never active (H_jj == 0) are zeroed.

    Example:
        >>> import torch
        >>> out = obs_sweep(torch.tensor([[1.0, 2.0]]), torch.eye(2), dampening=0.01, blocksize=128,
        ...                 selector=FixedSelector(torch.tensor([[True, False]])))
        >>> out.weight.tolist(), out.pruned.tolist()
        ([[0.0, 2.0]], [[True, False]])
    """
    # H itself is only read: the factor is built from one copy of it (a wide layer's H is ~1 GB).
    work = weight.detach().float().clone() if order is None else weight.detach().float()[:, order]
    dead = hessian.diagonal() == 0
    work[:, dead if order is None else dead[order]] = 0.0
    rows, cols = work.shape
    upper = inverse_hessian_cholesky(hessian, dampening, order=order, dtype=work.dtype, repair_dead=True)
    diag = upper.diagonal()
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    q_all = torch.zeros(rows, cols) if quantizer is not None else None
    select_group = selector.group if selector is not None else None
    step = _aligned_blocksize(blocksize, select_group, quantizer.group if quantizer is not None else None)
    for i1 in range(0, cols, step):
        i2 = min(i1 + step, cols)
        block = work[:, i1:i2].clone()
        done = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        u_block = upper[i1:i2, i1:i2]
        if selector is not None and select_group is None:
            scores = work[:, i1:] ** 2 / diag[i1:] ** 2
            pruned[:, i1:i2] = selector.choose(scores, i1, i2, pruned)
        for i in range(i2 - i1):
            column = i1 + i
            if selector is not None and select_group is not None and i % select_group == 0:
                stop = min(i + select_group, i2 - i1)
                scores = block[:, i:stop] ** 2 / diag[column : i1 + stop] ** 2
                pruned[:, column : i1 + stop] = selector.choose(scores, column, i1 + stop, pruned)
            values = block[:, i]
            target = values.masked_fill(pruned[:, column], 0.0)
            if quantizer is not None:
                quantizer.refresh(column, block[:, i:], pruned[:, column:i2])
                q, target = quantizer.quantize(target, column)
                q_all[:, column] = q  # type: ignore[index]
            error = (values - target) / u_block[i, i]
            block[:, i:] -= error.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            done[:, i] = target
            errors[:, i] = error
        work[:, i1:i2] = done
        work[:, i2:] -= errors @ upper[i1:i2, i2:]
    if order is not None:
        inverse = torch.argsort(order)
        work, pruned = work[:, inverse], pruned[:, inverse]
        q_all = q_all[:, inverse] if q_all is not None else None
    return SweepResult(work, pruned, q_all)


def _row_selector(
    weight: torch.Tensor, hessian: torch.Tensor, spec: MaskSpec, dampening: float
) -> SweepSelector:
    return RowLookaheadSelector(count_pruned(weight.shape[1], spec.sparsity))


def _nm_selector(
    weight: torch.Tensor, hessian: torch.Tensor, spec: MaskSpec, dampening: float
) -> SweepSelector:
    n, m = spec.n, spec.m
    if weight.shape[1] % m:  # type: ignore[operator]
        raise ValueError(
            f"N:M pattern {n}:{m} needs in_features divisible by {m}; weight shape is {tuple(weight.shape)}"
        )
    return GroupSelector(spec.m, lambda width: n)  # type: ignore[arg-type, return-value]


def _bbs_selector(
    weight: torch.Tensor, hessian: torch.Tensor, spec: MaskSpec, dampening: float
) -> SweepSelector:
    sparsity = spec.sparsity
    return GroupSelector(spec.bank, lambda width: count_kept(width, sparsity))


def _block_selector(
    weight: torch.Tensor, hessian: torch.Tensor, spec: MaskSpec, dampening: float
) -> SweepSelector:
    # Whole blocks span many columns and rows, so they are chosen up front from the OBS saliency
    # w^2 / [H_F^-1]_jj; the sweep then compensates with that fixed mask.
    hessian, weight = repair_dead_inputs(hessian, weight)
    diag = inverse_hessian_cholesky(hessian, dampening).diagonal().float()
    return FixedSelector(~select_mask(weight**2 / diag**2, spec))


SPARSEGPT_SELECTORS: dict[str, Callable[[torch.Tensor, torch.Tensor, MaskSpec, float], SweepSelector]] = {
    "unstructured": _row_selector,
    "nm": _nm_selector,
    "bbs": _bbs_selector,
    "block": _block_selector,
}


def build_sparsegpt_selector(
    weight: torch.Tensor, hessian: torch.Tensor, spec: MaskSpec, dampening: float
) -> SweepSelector:
    """The in-sweep mask chooser for `spec`'s pattern.

    Example:
        >>> import torch
        >>> build_sparsegpt_selector(torch.ones(2, 8), torch.eye(8), MaskSpec("bbs", 0.5, bank=4), 0.01).group
        4
    """
    if spec.kind not in SPARSEGPT_SELECTORS:
        raise ValueError(f"pattern {spec.kind} is handled by structured pruning")
    return SPARSEGPT_SELECTORS[spec.kind](weight, hessian, spec, dampening)


def prune_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    spec: MaskSpec,
    *,
    dampening: float = 0.01,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT-pruned weight (float32, compensated) and keep-mask (True = kept).

    Example:
        >>> import torch
        >>> w, keep = prune_sparsegpt(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), torch.eye(4),
        ...                           MaskSpec("unstructured", 0.5))
        >>> w.tolist(), keep.tolist()
        ([[0.0, -3.0, 2.0, 0.0]], [[False, True, True, False]])
    """
    selector = build_sparsegpt_selector(weight, hessian, spec, dampening)
    result = obs_sweep(weight, hessian, dampening=dampening, blocksize=blocksize, selector=selector)
    return result.weight, ~result.pruned
