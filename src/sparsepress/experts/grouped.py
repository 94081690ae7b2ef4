"""Running the experts of one MoE layer: a native grouped call, per-expert modules, or pure torch.

- **native grouped** (`NativeExperts`, csrc/experts.cpp): one call per layer and forward; tokens are
  batched per expert (prefill), and only the selected experts' packed weights are read (decode reads
  the k chosen experts of each token). Taken when every expert matrix is a SparseLinear with a native
  kernel and nothing hooks them (calibration hooks see the per-expert calls instead).
- **per-expert modules** (`module_experts`): transformers' loop over the experts hit, each projection
  its own module call (SparseLinear's native kernel, or nn.Linear while still dense).
- **reference** (`reference_experts`): the same loop with every packed matrix unpacked and run by
  `sparsepress.kernels.reference_linear` (activations quantized per token as the kernels do): what the
  tests compare the native paths with.

Example:
    >>> import torch
    >>> from sparsepress.nn import SparseLinear
    >>> from sparsepress.nn.experts import Expert, RoutedExperts
    >>> def packed(out, inp):
    ...     return SparseLinear.from_linear(torch.nn.Linear(inp, out, bias=False), format="dense", dtype="int8")
    >>> experts = RoutedExperts([Expert(packed(8, 4), packed(4, 4)) for _ in range(3)], activation="silu")
    >>> x, index, weights = torch.randn(6, 4), torch.randint(0, 3, (6, 1)), torch.ones(6, 1)
    >>> torch.allclose(run_experts(experts, x, index, weights), reference_experts(experts, x, index, weights), atol=1e-4)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels, native
from ..nn import SparseLinear
from ..nn.experts import RoutedExperts


@dataclass(frozen=True)
class GroupedHandle:
    """A layer's native grouped handle and the modules and packed values it was built from."""

    modules: tuple[nn.Module, ...]
    sources: tuple[torch.Tensor, ...]
    handle: Any

    def fits(self, modules: list[nn.Module]) -> bool:
        if len(modules) != len(self.modules):
            return False
        for a, b, s in zip(modules, self.modules, self.sources):
            if a is not b or a.__dict__.get("packed") is None or a.packed.values is not s:  # type: ignore[union-attr]
                return False
        return True



def _any_hooked(modules: list[nn.Module]) -> bool:
    for m in modules:
        if m._forward_pre_hooks or m._forward_hooks:
            return True
    return False


def native_handle(experts: RoutedExperts) -> Any:
    """The layer's `NativeExperts` handle, or None when some expert matrix has no native kernel here.

    Example:
        >>> from sparsepress.nn.experts import Expert
        >>> dense = RoutedExperts([Expert(nn.Linear(4, 8), nn.Linear(4, 4))], activation="silu")
        >>> native_handle(dense) is None
        True
    """
    lib = native.module()
    if lib is None or experts.activation is None:
        return None
    modules = experts.projections()
    if _any_hooked(modules):
        return None
    cached: GroupedHandle | None = experts._grouped
    if cached is not None and cached.fits(modules):  # decode: checked on every call, so kept cheap
        return cached.handle
    if not all(isinstance(m, SparseLinear) and kernels.native_supports(m.packed) for m in modules):
        return None
    plans = [kernels._plan_of(m.packed) for m in modules]  # type: ignore[union-attr]
    if any(plan is None for plan in plans):
        return None
    biases = [None if m.bias is None else m.bias.float().contiguous() for m in modules]  # type: ignore[union-attr]
    handle = lib.NativeExperts([p.handle for p in plans[0::2]], [p.handle for p in plans[1::2]],  # type: ignore[union-attr]
                               biases[0::2], biases[1::2], experts.hidden_size, experts.intermediate_size,
                               kernels.activation_code(experts.activation))
    experts._grouped = GroupedHandle(tuple(modules), tuple(m.packed.values for m in modules), handle)  # type: ignore[union-attr]
    return handle


def _loop(experts: RoutedExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
          expert_forward: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """transformers' loop: each expert hit, on its tokens, weighted and added in expert order."""
    out = torch.zeros_like(x)
    hit = torch.unique(index[index < experts.num_experts])
    for e in hit.tolist():
        token_idx, slot = torch.where(index == e)
        y = expert_forward(e, x[token_idx]) * weights[token_idx, slot, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def module_experts(experts: RoutedExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The experts hit, each projection its own module call (hooks see exactly the routed tokens)."""
    return _loop(experts, x, index, weights, lambda e, xe: experts[e](xe, experts.act_fn))


def _reference_projection(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(module, SparseLinear):
        y = kernels.reference_linear(x, module.packed, module.bias)
        return kernels.ACTIVATIONS[module.activation][1](y) if module.activation else y
    return F.linear(x, module.weight, module.bias)  # type: ignore[arg-type]


def reference_experts(experts: RoutedExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Pure torch: every packed matrix unpacked and run by `kernels.reference_linear`."""
    def forward(e: int, xe: torch.Tensor) -> torch.Tensor:
        expert = experts[e]
        gate, up = _reference_projection(expert.gate_up_proj, xe).chunk(2, dim=-1)
        return _reference_projection(expert.down_proj, experts.act_fn(gate) * up)

    return _loop(experts, x.float(), index, weights.float(), forward)


def run_experts(experts: RoutedExperts, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_j weights[t, j] * expert_{index[t, j]}(x[t]) (index `num_experts`: no expert); the
    native grouped call where it applies, else `module_experts`. Updates `experts.counts`."""
    counts = experts.counts
    counts.tokens += x.shape[0]
    handle = native_handle(experts)
    if handle is None or x.requires_grad and torch.is_grad_enabled() or not x.is_cpu:
        counts.evaluations += int((index < experts.num_experts).sum())
        return module_experts(experts, x, index, weights)
    dtype = x.dtype
    x = x.to(torch.float32).contiguous()
    index = index.to(torch.int64).contiguous()
    weights = weights.to(torch.float32).contiguous()
    out = native.output_tensor(x.shape[0], experts.hidden_size)
    evaluations, nbytes = handle.call_raw(x.data_ptr(), x.shape[0], index.shape[1], index.data_ptr(),
                                          weights.data_ptr(), out.data_ptr(), torch.get_num_threads())
    counts.evaluations += evaluations
    counts.bytes_read += nbytes
    return out if dtype == torch.float32 else out.to(dtype)
