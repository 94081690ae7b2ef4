"""Activation (contextual) sparsity: inputs of a Linear below a calibrated magnitude are zeroed at run time.

Each compressed Linear may carry thresholds, one per stored activation-sparsity level (the fraction of
its inputs that fall below the threshold on calibration data); the model's `RuntimeLevels` say which
level is active ("activation" knob, 0 = off). `set_activation_sparsity` switches every layer at once.

Example:
    >>> import torch
    >>> from sparsepress.nn import SparseLinear
    >>> model = torch.nn.Sequential(SparseLinear.from_linear(torch.nn.Linear(4, 2), format="dense"))
    >>> install_thresholds(model, {"0": torch.tensor([0.5])}, levels=[0.5], active=0.5)
    >>> x = torch.tensor([[0.1, -2.0, 0.3, 1.0]])
    >>> torch.allclose(model(x), model[0].packed.unpack() @ torch.tensor([0.0, -2.0, 0.0, 1.0]) + model[0].bias)
    True
    >>> set_activation_sparsity(model, 0)
    >>> torch.allclose(model(x), model[0].packed.unpack() @ x[0] + model[0].bias)
    True
"""

from __future__ import annotations

import torch
from torch import nn

from .levels import RuntimeLevels, attach, runtime_levels

KNOB = "activation"


def sparsify_inputs(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """x with every entry of magnitude below `threshold` set to zero (the reference semantics).

    Example:
        >>> sparsify_inputs(torch.tensor([0.1, -0.6, 0.5]), 0.5).tolist()
        [0.0, -0.6000000238418579, 0.5]
    """
    return x.masked_fill(x.abs() < threshold, 0.0)


def active_threshold(layer: nn.Module) -> float:
    """The threshold `layer` applies to its inputs in the current call (0.0: none).

    Example:
        >>> active_threshold(nn.Linear(2, 2))
        0.0
    """
    thresholds = getattr(layer, "act_thresholds", None)
    levels = runtime_levels(layer)
    if thresholds is None or levels is None:
        return 0.0
    level = levels.get(KNOB)
    if level == 0.0:
        return 0.0
    offered = levels.offered(KNOB)[1:]  # without the 0 ("off") level
    return float(thresholds[offered.index(level)])


def install_thresholds(model: nn.Module, thresholds: dict[str, torch.Tensor], levels: list[float],
                       active: float) -> None:
    """Give each named layer its thresholds (one per level of `levels`, 0 excluded) and make `active`
    the model's current activation-sparsity level (see the module example)."""
    ladder = sorted(float(level) for level in levels if level > 0)
    for name, values in thresholds.items():
        layer = model.get_submodule(name)
        values = values.detach().float().reshape(-1).contiguous()
        if values.numel() != len(ladder):
            raise ValueError(f"layer '{name}': {values.numel()} thresholds for {len(ladder)} levels")
        layer.act_thresholds = values
        attach(model, layer)
    state = RuntimeLevels.of(model)
    state.offer(KNOB, [0.0, *ladder])
    state.set(KNOB, active)


def activation_levels(model: nn.Module) -> list[float]:
    """The activation-sparsity levels stored in `model` (0 = off included), or [] when it has none.

    Example:
        >>> activation_levels(nn.Linear(2, 2))
        []
    """
    return RuntimeLevels.of(model).offered(KNOB) if "_sparsepress_levels" in model.__dict__ else []


def set_activation_sparsity(model: nn.Module, sparsity: float) -> None:
    """Switch every layer of `model` to the stored activation-sparsity level `sparsity` (0 turns it off).

    Calls already running finish at their level; ValueError listing the stored levels for any other
    value (see the module example).
    """
    if not activation_levels(model):
        raise ValueError("this model stores no activation-sparsity thresholds (compress it with an "
                         "activation_sparsity stage)")
    RuntimeLevels.of(model).set(KNOB, float(sparsity))


def _register_knob() -> None:
    from ..adaptive import Knob, register_knob

    register_knob(Knob(KNOB, levels=activation_levels, apply=set_activation_sparsity))


_register_knob()
