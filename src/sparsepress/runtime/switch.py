"""Turning the native block path on and off for one model (and for the process, by environment).

Example:
    >>> import torch
    >>> use_native_blocks(torch.nn.Linear(2, 2)), disable_native_blocks(torch.nn.Linear(2, 2))
    (False, False)
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..fusion import probe_inputs
from .entries import NativeForward
from .plan import build_plan

ENV_SWITCH = "SPARSEPRESS_NATIVE_BLOCKS"
# Native and module paths differ by float rounding in the norms and softmax, which flips a few int8
# activation roundings downstream: ~1e-3 of the output's norm on MiniLM (measured). A wrong plan (a
# mis-read family, a missed option) moves it by tens of percent.
TOLERANCE = 2e-2
# Some compressed models amplify that: per-token int8 activations with outliers turn a 1e-6 nudge of the
# embeddings into a ~6% change of MiniLM's output after SparseGPT + GPTQ (measured). The check then allows
# a few times the module path's own spread under such a nudge, never more than CEILING: a wrong plan
# differs by the output's whole norm.
NUDGE, SPREAD_FACTOR, CEILING = 1e-6, 3.0, 0.25


def native_blocks_allowed() -> bool:
    """False when `SPARSEPRESS_NATIVE_BLOCKS` is 0 / false / no / off (then no model gets native blocks).

    Example:
        >>> isinstance(native_blocks_allowed(), bool)
        True
    """
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def native_blocks_of(model: nn.Module) -> NativeForward | None:
    """The native forward installed in `model` (None: it runs on its modules).

    Example:
        >>> native_blocks_of(torch.nn.Linear(2, 2)) is None
        True
    """
    for module in model.modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, NativeForward):
            return forward
    return None


def use_native_blocks(model: nn.Module, *, check: bool = True) -> bool:
    """Run `model`'s transformer blocks natively where its family and layers allow it; True if they now do.

    With `check` (default) the native and module paths are compared on a probe input first, and a
    disagreement leaves the model on its modules. Safe to call again.
    """
    if not native_blocks_allowed():
        return _refused(model, f"{ENV_SWITCH} switches native blocks off")
    if native_blocks_of(model) is not None:
        return True
    plan = build_plan(model)
    if isinstance(plan, str):
        return _refused(model, plan)
    forward = NativeForward(plan, plan.entry.forward)
    plan.entry.forward = forward
    if check and not _agrees(model, forward):
        disable_native_blocks(model)
        return _refused(model, "the native path disagreed with the module path on a probe input")
    model.__dict__.pop(_REASON, None)
    return True


def native_blocks_reason(model: nn.Module) -> str | None:
    """Why `model` runs on its modules: the reason its last `use_native_blocks` gave (None: it did not
    refuse, or was never asked).

    Example:
        >>> model = torch.nn.Linear(2, 2)
        >>> use_native_blocks(model), native_blocks_reason(model)
        (False, 'no native block plan for model_type None')
    """
    return model.__dict__.get(_REASON)


_REASON = "_sparsepress_native_reason"  # kept in the model's own __dict__ (copies carry it)


def _refused(model: nn.Module, reason: str) -> bool:
    model.__dict__[_REASON] = reason
    return False


def disable_native_blocks(model: nn.Module) -> bool:
    """Put `model` back on its modules; True if it had native blocks.

    Example:
        >>> disable_native_blocks(torch.nn.Linear(2, 2))
        False
    """
    found = False
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), NativeForward):
            del module.__dict__["forward"]
            found = True
    return found


def _outputs(model: nn.Module, probe: dict[str, torch.Tensor]) -> torch.Tensor | None:
    with torch.inference_mode():
        out = model(**probe)
    first = out[0] if isinstance(out, (tuple, list)) else next(iter(out.values()), None)
    return first if isinstance(first, torch.Tensor) else None


def _agrees(model: nn.Module, forward: NativeForward) -> bool:
    """Whether the native path runs on a probe input and gives the module path's outputs (within TOLERANCE,
    or within a few times the module path's own spread when the plan's embeddings are nudged by
    rounding-sized noise)."""
    probe: Any = probe_inputs(model)
    if probe is None:
        return False
    if "use_cache" in _parameters(model):
        probe["use_cache"] = False
    was_training = model.training
    model.eval()
    try:
        forward.enabled = False
        reference = _outputs(model, probe)
        forward.enabled, forward.native_calls = True, 0
        native = _outputs(model, probe)
        if reference is None or native is None or forward.native_calls == 0 or reference.shape != native.shape:
            return False
        if not bool(torch.isfinite(native).all()):
            return False
        if outputs_agree(reference, native):
            return True
        # only a model the plain tolerance refuses pays for a second module-path run, nudged
        forward.enabled = False
        nudged = _nudged_outputs(model, probe, getattr(forward.plan.entry, forward.plan.roles.embeddings, None))
    except Exception:  # noqa: BLE001 - a model the probe cannot drive stays on its modules
        return False
    finally:
        forward.enabled = True
        model.train(was_training)
    return outputs_agree(reference, native, nudged)


def outputs_agree(reference: torch.Tensor, native: torch.Tensor, nudged: torch.Tensor | None = None) -> bool:
    """Whether `native` is within TOLERANCE of `reference` (relative norm), or within SPREAD_FACTOR times
    the spread of `nudged` (the module path under a rounding-sized nudge), capped at CEILING.

    Example:
        >>> ref = torch.ones(4)
        >>> outputs_agree(ref, ref * 1.05), outputs_agree(ref, ref * 1.05, nudged=ref * 1.03)
        (False, True)
    """
    scale = float(reference.norm()) or 1.0
    allowed = TOLERANCE
    if nudged is not None and nudged.shape == reference.shape:
        spread = float((nudged - reference).norm()) / scale
        allowed = min(CEILING, max(TOLERANCE, SPREAD_FACTOR * spread))
    return float((native - reference).norm()) <= allowed * scale


def _nudged_outputs(model: nn.Module, probe: dict[str, torch.Tensor], embeddings: Any) -> torch.Tensor | None:
    """The module path's outputs with the embeddings' output scaled by 1 + NUDGE * noise (fixed seed)."""
    if not isinstance(embeddings, nn.Module):
        return None
    generator = torch.Generator().manual_seed(0)

    def nudge(module: nn.Module, inputs: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            return output * (1 + NUDGE * torch.randn(output.shape, generator=generator))
        return None

    handle = embeddings.register_forward_hook(nudge)
    try:
        return _outputs(model, probe)
    finally:
        handle.remove()


def _parameters(model: nn.Module) -> set[str]:
    import inspect

    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


__all__ = ["ENV_SWITCH", "disable_native_blocks", "native_blocks_allowed", "native_blocks_of", "native_blocks_reason",
           "outputs_agree", "use_native_blocks"]
