"""`RoutedExperts`: the experts of one mixture-of-experts layer, one module per expert.

transformers 5 keeps a layer's experts fused in two 3-D parameters (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]); sparsepress unfuses them (`sparsepress.models.moe.unfuse_experts_`) into this
module, whose expert `e` is child `"e"` with two Linear layers, `gate_up_proj` [2I, H] (gate rows, then
up rows) and `down_proj` [H, I]. Every expert matrix is then an ordinary Linear the compression passes
reach (calibrated on the tokens routed to that expert only) and, once compressed, a SparseLinear holding
one packed matrix. The forward has the signature of transformers' experts modules
(`hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]`), so the model's own MoE block,
router and shared expert stay as they are.

Adaptive routing (`top_p`): per token, the fewest of its top-k experts whose share of the token's
top-k gate mass reaches `top_p`; the kept weights are rescaled to the token's original top-k mass
(renormalised routers stay normalised). `top_p=None` (or 1) is plain top-k.

Example:
    >>> import torch
    >>> experts = RoutedExperts([Expert(torch.nn.Linear(4, 6, bias=False), torch.nn.Linear(3, 4, bias=False))
    ...                          for _ in range(2)], activation="silu")
    >>> x = torch.randn(5, 4)
    >>> out = experts(x, torch.tensor([[0, 1]] * 5), torch.full((5, 2), 0.5))
    >>> out.shape, experts.counts.evaluations
    (torch.Size([5, 4]), 10)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# transformers' `hidden_act` names -> the activations the kernels apply (sparsepress.kernels.ACTIVATIONS)
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu"}


def activation_function(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The torch function of an activation name of `sparsepress.kernels.ACTIVATIONS`.

    Example:
        >>> activation_function("relu")(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """
    from ..kernels import ACTIVATIONS

    return ACTIVATIONS[name][1]


class Expert(nn.Module):
    """One expert: `down_proj(act(gate) * up)` with `gate, up = gate_up_proj(x).chunk(2)`.

    Example:
        >>> e = Expert(torch.nn.Linear(4, 6), torch.nn.Linear(3, 4))
        >>> e(torch.ones(2, 4), F.silu).shape
        torch.Size([2, 4])
    """

    def __init__(self, gate_up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        version = self.__dict__.get("_owner_version")
        if version is not None and name in ("gate_up_proj", "down_proj"):
            version[0] += 1  # the owning RoutedExperts' cached list of matrices is stale

    def intermediate(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`act(gate) * up`: what `down_proj` receives."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return act(gate) * up

    def forward(self, x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return self.down_proj(self.intermediate(x, act))


@dataclass
class ExpertCounts:
    """What a RoutedExperts module evaluated since the last `reset()`: tokens it received, (token,
    expert) evaluations, and bytes of packed weights read (counted by the native grouped path).

    Example:
        >>> c = ExpertCounts(tokens=4, evaluations=6); c.per_token
        1.5
    """

    tokens: int = 0
    evaluations: int = 0
    bytes_read: int = 0

    @property
    def per_token(self) -> float:
        """Experts evaluated per token."""
        return self.evaluations / self.tokens if self.tokens else 0.0

    def reset(self) -> None:
        self.tokens = self.evaluations = self.bytes_read = 0


def select_top_p(index: torch.Tensor, weights: torch.Tensor, top_p: float | None,
                 none: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's fewest top-k slots whose share of its top-k gate mass reaches `top_p`.

    Dropped slots get expert index `none` (selects nothing) and weight 0; the kept weights are
    rescaled to the token's original top-k mass.

    Example:
        >>> idx, w = select_top_p(torch.tensor([[3, 1], [0, 2]]), torch.tensor([[0.9, 0.1], [0.6, 0.4]]), 0.8, 4)
        >>> idx.tolist(), [[round(v, 3) for v in row] for row in w.tolist()]
        ([[3, 4], [0, 2]], [[1.0, 0.0], [0.6, 0.4]])
    """
    if top_p is None or top_p >= 1.0 or index.shape[-1] < 2:
        return index, weights
    total = weights.sum(dim=-1, keepdim=True)
    share, order = (weights / total.clamp_min(torch.finfo(weights.dtype).tiny)).sort(dim=-1, descending=True)
    before = share.cumsum(dim=-1) - share  # the mass of the larger slots
    keep = torch.zeros_like(share, dtype=torch.bool).scatter_(-1, order, before < top_p)
    kept = torch.where(keep, weights, torch.zeros_like(weights))
    scale = total / kept.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return torch.where(keep, index, torch.full_like(index, none)), kept * scale


class RoutedExperts(nn.Module):
    """The experts of one MoE layer (child `"e"` is expert e); see the module docstring.

    `activation`: a name of `sparsepress.kernels.ACTIVATIONS`, or a callable for others (torch path
    only). `source_class`: the transformers experts class this was unfused from (to fuse back).
    """

    def __init__(self, experts: Sequence[Expert], activation: str | Callable[[torch.Tensor], torch.Tensor],
                 source_class: type[nn.Module] | None = None):
        super().__init__()
        if not experts:
            raise ValueError("a MoE layer needs at least one expert")
        # bumped whenever an expert or one of its matrices is replaced (compression swaps them for packed
        # ones): decode checks the matrices on every call, and rebuilding their list each time costs
        self._version = [0]
        self._projections: tuple[int, list[nn.Module]] | None = None
        for index, expert in enumerate(experts):
            self._adopt(index, expert)
        first = experts[0].gate_up_proj
        self.hidden_size = int(first.in_features)
        self.intermediate_size = int(first.out_features) // 2
        self.activation = activation if isinstance(activation, str) else None
        self.act_fn = activation_function(activation) if isinstance(activation, str) else activation
        self.source_class = source_class
        self.top_p: float | None = None
        self.counts = ExpertCounts()
        self._grouped: Any = None  # the native grouped handle (sparsepress.experts.grouped), made on first use

    @property
    def num_experts(self) -> int:
        return sum(1 for name in self._modules if name.isdigit())

    def __len__(self) -> int:
        return self.num_experts

    def __getitem__(self, index: int) -> Expert:
        return self._modules[str(index)]  # type: ignore[return-value]

    def __iter__(self) -> Iterator[Expert]:
        return (self[e] for e in range(self.num_experts))

    def __getstate__(self) -> dict[str, Any]:
        # copies (the dense twin of a block) rebuild the native grouped handle on first use
        return {**self.__dict__, "_grouped": None}

    def _adopt(self, index: int, expert: Expert) -> None:
        expert.__dict__["_owner_version"] = self._version
        self.add_module(str(index), expert)
        self._version[0] += 1

    def projections(self) -> list[nn.Module]:
        """Every expert's gate_up_proj and down_proj, expert by expert."""
        cached = self._projections
        if cached is not None and cached[0] == self._version[0]:
            return cached[1]
        modules = [m for expert in self for m in (expert.gate_up_proj, expert.down_proj)]
        self._projections = (self._version[0], modules)
        return modules

    def set_experts_(self, experts: Sequence[Expert]) -> None:
        """Replace the experts (after removal or merging), renumbered from 0."""
        for name in [n for n in self._modules if n.isdigit()]:
            del self._modules[name]
        for index, expert in enumerate(experts):
            self._adopt(index, expert)
        self._grouped = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        from ..experts.grouped import run_experts

        none = self.num_experts
        index, weights = select_top_p(top_k_index, top_k_weights, self.top_p, none)
        return run_experts(self, hidden_states, index, weights)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"activation={self.activation or 'custom'}" + (f", top_p={self.top_p}" if self.top_p else ""))
