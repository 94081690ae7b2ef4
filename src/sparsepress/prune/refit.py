"""Least-squares refit of a pruned weight's kept entries, with its mask fixed.

SparseGPT decides the mask and compensates the error column by column in one pass, which is close to,
but not, the best kept values for that mask. Given the calibration Hessian H, each output row r has an
exact optimum: its kept set S solves  H_SS w_S = (H w_dense)_S,  which minimises
||X (w - w_dense)||^2 over weights that are zero off S. All rows run preconditioned conjugate gradients
together, from the pruned weight: each step lowers that error, and a per-row direct solve (k^3 each)
would cost far more on wide layers.

Example:
    >>> import torch
    >>> h = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> w = refit_kept(torch.tensor([[1.0, 1.0]]), h, torch.tensor([[True, False]]), dampening=0.0)
    >>> [round(v, 5) for v in w[0].tolist()]
    [1.5, 0.0]
"""

from __future__ import annotations

import torch

# Each iteration costs one [out, in] x [in, in] float32 product. Measured on MiniLM (SparseGPT 50% +
# GPTQ): fidelity 0.926 after 10 iterations, 0.928 after 40; on random 2048-wide layers 20 iterations
# reach the per-row direct solve's error to 1e-6, in 4 s where the direct solve takes 42 s.
CG_ITERATIONS = 20
CG_TOLERANCE = 1e-5
# CG solves a row of k kept entries in k steps (exact arithmetic); when no row keeps more than this,
# that many steps are cheap and ill-conditioned small layers still reach the optimum.
SMALL_SYSTEM = 64
# Rows per float64 temporary: the exact float64 products and sums run on [ROW_CHUNK, in] slices, not on
# the whole [out, in] (0.34 GiB each for 4096 x 11008); every row's arithmetic is unchanged.
ROW_CHUNK = 256


def _by_rows(rows: int, compute) -> torch.Tensor:  # type: ignore[no-untyped-def]
    # compute(i, j) for each row range, concatenated: the same bits as computing all rows at once.
    return torch.cat([compute(i, min(i + ROW_CHUNK, rows)) for i in range(0, max(rows, 1), ROW_CHUNK)])


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(a.double() * b.double()).sum(dim=1)`, a chunk of rows at a time.

    Example:
        >>> _row_dots(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])).tolist()
        [11.0]
    """
    return _by_rows(a.shape[0], lambda i, j: (a[i:j].double() * b[i:j].double()).sum(dim=1))


def damp_(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Add `dampening * mean(diag H)` to H's diagonal in place (SparseGPT's convention); returns H.

    Example:
        >>> damp_(torch.eye(2, dtype=torch.float64) * 2, 0.5).diagonal().tolist()
        [3.0, 3.0]
    """
    mean = float(hessian.diagonal().mean())
    hessian.diagonal().add_(dampening * mean if mean > 0 else dampening)
    return hessian


def damped(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """float64 copy of H, damped (`damp_`).

    Example:
        >>> damped(torch.eye(2) * 2, 0.5).diagonal().tolist()
        [3.0, 3.0]
    """
    return damp_(hessian.to(torch.float64, copy=True), dampening)


def _solve_cg(weight: torch.Tensor, hessian: torch.Tensor, dampening: float, keep: torch.Tensor,
              start: torch.Tensor) -> torch.Tensor:
    # Every row at once: products are one GEMM with H, masked back onto each row's kept set. H is
    # scaled to a unit diagonal first (the Jacobi preconditioner, applied symmetrically), which also
    # makes float32 products (twice float64's rate, half its memory) accurate enough. One float64 copy
    # of H, damped and then scaled in place (the same bits as scaled copies), freed before the steps.
    rows = weight.shape[0]
    scaled = damped(hessian, dampening)
    scale = scaled.diagonal().clamp(min=1e-300).rsqrt()
    mask = keep.float()
    rhs = _by_rows(rows, lambda i, j: ((weight[i:j].to(torch.float64) @ scaled) * scale).float()) * mask
    scaled.mul_(scale.unsqueeze(1)).mul_(scale.unsqueeze(0))
    unit = scaled.float()
    y = _by_rows(rows, lambda i, j: (start[i:j].to(torch.float64) / scale).float()) * mask
    # the start's residual, exact
    residual = _by_rows(rows, lambda i, j: (rhs[i:j].double() - y[i:j].double() @ scaled).float()) * mask
    del scaled
    direction = residual.clone()
    rr = _row_dots(residual, residual)
    limit = (CG_TOLERANCE * _by_rows(rows, lambda i, j: rhs[i:j].double().norm(dim=1))) ** 2
    widest = int(keep.sum(dim=1).max()) if keep.numel() else 0
    steps = max(CG_ITERATIONS, widest + 1) if widest <= SMALL_SYSTEM else CG_ITERATIONS
    for _ in range(steps):
        if bool((rr <= limit).all()):
            break
        product = (direction @ unit) * mask
        step = (rr / _row_dots(direction, product).clamp(min=1e-300)).float()
        y += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * product
        rr_next = _row_dots(residual, residual)
        direction = residual + (rr_next / rr.clamp(min=1e-300)).float().unsqueeze(1) * direction
        rr = rr_next
    return _by_rows(rows, lambda i, j: (y[i:j].double() * scale).float())


def refit_kept(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, *, dampening: float = 0.01,
               start: torch.Tensor | None = None) -> torch.Tensor:
    """float32 weight, zero where `keep` is False, whose kept entries best reproduce `weight`'s outputs.

    `weight` is the dense target [out, in], `hessian` the calibration `X^T X` (any positive scale),
    `keep` the bool mask. `start` (e.g. SparseGPT's pruned weight) seeds the iterations (default:
    `weight` masked).
    Dead inputs (H_jj == 0) are left out of every row.

    Example:
        >>> import torch
        >>> w = refit_kept(torch.tensor([[1.0, -2.0]]), torch.eye(2), torch.tensor([[False, True]]))
        >>> [round(v, 5) for v in w[0].tolist()]
        [0.0, -2.0]
    """
    keep = keep & (hessian.diagonal() != 0).unsqueeze(0)
    return _solve_cg(weight, hessian, dampening, keep, start if start is not None else weight).float() * keep
