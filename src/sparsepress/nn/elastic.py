"""Elastic sparsity at run time: layers holding nested levels, all switched at once by `set_sparsity`.

An `ElasticLinear` runs the level its model's `RuntimeLevels` name for the current call ("sparsity"
knob; every call takes one snapshot when it enters the model, so a call never sees a mix of levels
while another thread switches). Switching is one assignment: nothing is read from disk or rebuilt
(GEMM panels are held per segment and serve every level), and the native call of the new level runs
only that level's segments, so its time follows the level (csrc/elastic.h).

Example:
    >>> import torch
    >>> from sparsepress.formats import ElasticWeight
    >>> w = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    >>> layer = ElasticLinear(ElasticWeight.pack(w, keeps=[w != 0, w > 1.5], levels=[0.25, 0.5]))
    >>> model = torch.nn.Sequential(layer)
    >>> install_levels(model, [0.25, 0.5], active=0.25)
    >>> model(torch.ones(1, 2)).tolist()
    [[3.0, 3.0]]
    >>> set_sparsity(model, 0.5)
    >>> model(torch.ones(1, 2)).tolist(), sparsity_levels(model)
    ([[2.0, 3.0]], [0.25, 0.5])
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import ElasticWeight, PackedWeight
from .levels import RuntimeLevels, attach, runtime_levels
from .sparse_linear import SparseLinear

KNOB = "sparsity"
_ROOT = "_sparsepress_elastic_root"  # marks the module whose levels offer the knob


class ElasticLinear(SparseLinear):
    """A SparseLinear over an `ElasticWeight`: y = x W_i^T + b + shift_i at the model's current level i.

    Outside a model with installed levels it runs its lowest level.
    """

    def __init__(self, packed: ElasticWeight, bias: torch.Tensor | None = None):
        if not isinstance(packed, ElasticWeight):
            raise TypeError(f"ElasticLinear needs an ElasticWeight, got {type(packed).__name__}")
        super().__init__(packed, bias)
        self._biases: tuple[torch.Tensor | None, list[torch.Tensor | None]] | None = None

    @property
    def levels(self) -> tuple[float, ...]:
        return self.packed.levels

    def active_level(self) -> int:
        """Index of the level this call runs (0: the lowest sparsity)."""
        state = runtime_levels(self)
        if state is None:
            return 0
        offered = state.offered(KNOB)
        value = state.get(KNOB, offered[0] if offered else 0.0)
        for index, level in enumerate(offered):
            if abs(level - value) < 1e-9:
                return index
        return 0

    def level_bias(self, level: int) -> torch.Tensor | None:
        """The bias at level `level`: the layer's bias plus that level's stored shift."""
        shifts = self.packed.shifts
        if shifts is None:
            return self.bias
        cached = self._biases
        if cached is None or cached[0] is not self.bias:  # the bias was replaced (bias correction)
            base = self.bias if self.bias is not None else torch.zeros(self.out_features)
            cached = (self.bias, [(base + shifts[i]).contiguous() for i in range(self.packed.n_levels)])
            self._biases = cached
        return cached[1][level]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..kernels import elastic_linear

        x = self._sparsify_inputs(x)
        level = self.active_level()
        if x.dtype == torch.float32:
            return elastic_linear(x, self.packed, level, self.level_bias(level), self.activation)
        lead = x.shape[:-1]
        y = elastic_linear(x.reshape(-1, self.in_features).to(torch.float32), self.packed, level,
                           self.level_bias(level), self.activation)
        return y.reshape(*lead, self.out_features).to(x.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized dense weight of the current level (materialized on each access)."""
        return self.packed.unpack(self.active_level())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format=elastic/{self.packed.base}, "
                f"dtype={self.packed.dtype}, levels={list(self.levels)}, bias={self.bias is not None}"
                + (f", activation={self.activation}" if self.activation else ""))


def linear_module(packed: PackedWeight, bias: torch.Tensor | None = None) -> SparseLinear:
    """The module that runs `packed`: an ElasticLinear for nested levels, else a SparseLinear.

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> type(linear_module(DenseWeight.pack(torch.ones(2, 2)))).__name__
        'SparseLinear'
    """
    return ElasticLinear(packed, bias) if isinstance(packed, ElasticWeight) else SparseLinear(packed, bias)


def _levels_owner(model: nn.Module) -> nn.Module | None:
    """The module whose levels offer elastic sparsity: `model`, or the first submodule with them (e.g. the
    transformer inside a sentence-transformers wrapper)."""
    return next((m for m in model.modules() if m.__dict__.get(_ROOT)), None)


def install_levels(model: nn.Module, levels: list[float], active: float | None = None) -> None:
    """Make every ElasticLinear of `model` follow the model's "sparsity" knob over `levels`, set to `active`
    (default: the lowest). ValueError when a layer stores another number of levels, or `active` is not one."""
    layers = [m for m in model.modules() if isinstance(m, ElasticLinear)]
    ladder = sorted(float(v) for v in levels)
    for layer in layers:
        if layer.packed.n_levels != len(ladder):
            raise ValueError(f"a layer stores {layer.packed.n_levels} levels, the model {len(ladder)}")
        attach(model, layer)
    state = RuntimeLevels.of(model)
    object.__setattr__(model, _ROOT, True)
    state.offer(KNOB, ladder)
    state.set(KNOB, ladder[0] if active is None else float(active))


def sparsity_levels(model: nn.Module) -> list[float]:
    """The elastic sparsity levels stored in `model`, lowest first ([] when it has none).

    Example:
        >>> sparsity_levels(nn.Linear(2, 2))
        []
    """
    owner = _levels_owner(model)
    return RuntimeLevels.of(owner).offered(KNOB) if owner is not None else []


def current_sparsity(model: nn.Module) -> float | None:
    """The elastic level calls of `model` start with now (None: no elastic levels).

    Example:
        >>> current_sparsity(nn.Linear(2, 2)) is None
        True
    """
    owner = _levels_owner(model)
    return RuntimeLevels.of(owner).get(KNOB) if owner is not None else None


def set_sparsity(model: nn.Module, sparsity: float) -> None:
    """Switch every elastic layer of `model` to the stored level `sparsity`, for calls starting from now.

    No file is read and nothing is rebuilt: one assignment, read once by each later call. Calls already
    running finish at their level. ValueError listing the stored levels for any other value, or when the
    model has no elastic levels (see the module example).
    """
    owner = _levels_owner(model)
    if owner is None:
        raise ValueError("this model stores no elastic sparsity levels (compress it with a list of sparsities, "
                         "e.g. prune.sparsity: [0.5, 0.7, 0.9])")
    RuntimeLevels.of(owner).set(KNOB, float(sparsity))


def _register_knob() -> None:
    from ..adaptive import Knob, register_knob

    register_knob(Knob(KNOB, levels=sparsity_levels, apply=set_sparsity))


_register_knob()
