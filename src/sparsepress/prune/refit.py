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
    scaled = damped(hessian, dampening)
    target = weight.to(torch.float64) @ scaled
    scale = scaled.diagonal().clamp(min=1e-300).rsqrt()
    scaled.mul_(scale.unsqueeze(1)).mul_(scale.unsqueeze(0))
    unit = scaled.float()
    mask = keep.float()
    rhs = (target * scale).float() * mask
    y = (start.to(torch.float64) / scale).float() * mask
    residual = (rhs.double() - y.double() @ scaled).float() * mask  # the start's residual, exact
    del scaled
    direction = residual.clone()
    rr = (residual.double() ** 2).sum(dim=1)
    limit = (CG_TOLERANCE * rhs.double().norm(dim=1)) ** 2
    widest = int(keep.sum(dim=1).max()) if keep.numel() else 0
    steps = max(CG_ITERATIONS, widest + 1) if widest <= SMALL_SYSTEM else CG_ITERATIONS
    for _ in range(steps):
        if bool((rr <= limit).all()):
            break
        product = (direction @ unit) * mask
        step = (rr / (direction.double() * product.double()).sum(dim=1).clamp(min=1e-300)).float()
        y += step.unsqueeze(1) * direction
        residual -= step.unsqueeze(1) * product
        rr_next = (residual.double() ** 2).sum(dim=1)
        direction = residual + (rr_next / rr.clamp(min=1e-300)).float().unsqueeze(1) * direction
        rr = rr_next
    return y.double() * scale


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
