"""Block plans: a model's transformer blocks described once for the native runtime (`_native.Stack`).

`build_plan(model)` reads the family's roles (`sparsepress.models.roles`), the blocks the layout adapter
finds and the HF config, and hands the native Stack pointers to the tensors the modules already hold
(packed layers' prepared handles, norm weights): nothing is copied, so the plan is not a second copy of
the model. It refuses (returns the reason as a string) whatever it cannot run exactly: another family,
a Linear that is not a packed layer with a native kernel, norms of another kind, an unknown activation.

Elastic layers (nested sparsity levels, `sparsepress.nn.elastic`) are projections too: one handle holds
every level, and each call hands the Stack the level index of its snapshot (`PlanGuard.level`), so
`set_sparsity` switches the native path with nothing rebuilt and a call never mixes levels.

`PlanGuard` is what each call checks before running natively: the modules and tensors the plan points
into are still the ones in the model, nobody hooks the blocks, no gradients are wanted. It also hands
each call the activation-sparsity thresholds of the level the call runs at (one per thresholded
projection, by the projection's slot): the Stack applies them in its kernels.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> dense = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=50))
    >>> build_plan(dense)  # dense nn.Linear layers: nothing native to run
    'encoder.layer.0.attention.self.query is a Linear, not a packed layer with a native kernel'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter, is_
from typing import Any

import torch
from torch import nn

from .. import native
from ..formats.base import mask_to_bits
from ..kernels import activation_code, elastic_native_plan, native_handle
from ..models import find_layout
from ..models.roles import BlockRoles, roles_for
from ..nn import SparseLinear
from ..nn.elastic import ElasticLinear
from ..nn.activation import KNOB, active_threshold
from ..nn.levels import runtime_levels

# transformers' activation names (config.hidden_act) -> the kernels' fused activation
ACTIVATION_NAMES = {
    "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
    "relu": "relu", "silu": "silu", "swish": "silu",
}


@dataclass
class PlanGuard:
    """Cheap per-call checks that a plan still describes the model (identity, not values: tensors the
    plan points into may change in place, e.g. `load_state_dict`, and the plan reads the new values)."""

    owners: list[tuple[dict, str, Any]] = field(default_factory=list, repr=False)  # owner[key] is still `value`
    modules: list[nn.Module] = field(default_factory=list, repr=False)  # hooked modules: the module path
    parameters: list[torch.Tensor] = field(default_factory=list, repr=False)
    _columns: tuple | None = field(default=None, repr=False)  # owners as three tuples, for current()
    # layers with activation-sparsity thresholds (nn/activation.py), in the order of their Stack slots
    thresholded: list[nn.Module] = field(default_factory=list, repr=False)
    _by_level: dict[float, torch.Tensor | None] = field(default_factory=dict, repr=False)
    elastic: ElasticLinear | None = field(default=None, repr=False)  # one elastic layer: its level is the call's

    def watch(self, owner: dict, key: str) -> Any:
        """Record `owner[key]` (a module's `_modules`, `_parameters`, `_buffers` or `__dict__`); return it."""
        value = owner[key]
        if not any(o is owner and k == key for o, k, _ in self.owners[-8:]):  # paths share their first levels
            self.owners.append((owner, key, value))
        return value

    def current(self) -> bool:
        """Whether every watched slot still holds what the plan was built from (C-level loops: ~250 slots
        for MiniLM, checked on every call)."""
        if self._columns is None or len(self._columns[0]) != len(self.owners):
            self._columns = tuple(zip(*self.owners)) if self.owners else ((), (), ())  # type: ignore[assignment]
        owners, keys, values = self._columns  # type: ignore[misc]
        return all(map(is_, map(dict.get, owners, keys), values))

    def hooked(self) -> bool:
        """Whether any forward hook besides transformers' idle output-capture hooks watches the blocks."""
        if not (any(map(_FORWARD_HOOKS, self.modules)) or any(map(_PRE_HOOKS, self.modules))):
            return False
        return any(_active_hooks(m) for m in self.modules)

    def slot(self, module: nn.Module) -> int:
        """The Stack slot of `module`'s activation-sparsity threshold (-1: it has none); registers it."""
        if "act_thresholds" not in module._buffers or self.watch(module._buffers, "act_thresholds") is None:
            return -1
        if module not in self.thresholded:
            self.thresholded.append(module)
            self._by_level.clear()
        return next(i for i, m in enumerate(self.thresholded) if m is module)

    def thresholds(self) -> torch.Tensor | None:
        """The thresholds this call applies, by slot (float32), or None when no layer sparsifies it.

        Read at the start of a call (the level of the calling thread's snapshot, nn/levels.py), so one
        call sees one level; built once per level.
        """
        if not self.thresholded:
            return None
        levels = runtime_levels(self.thresholded[0])
        level = levels.get(KNOB) if levels is not None else 0.0
        if level not in self._by_level:
            values = [active_threshold(m) for m in self.thresholded]
            self._by_level[level] = torch.tensor(values, dtype=torch.float32) if any(values) else None
        return self._by_level[level]

    def levels_of(self, layer: ElasticLinear) -> None:
        """Register an elastic layer; every call then runs the level its model's snapshot names."""
        if self.elastic is None:
            self.elastic = layer

    def level(self) -> int:
        """The elastic level index this call runs (0 without elastic layers): read at the start of a
        call from the calling thread's snapshot (nn/levels.py), so one call runs one level throughout."""
        return 0 if self.elastic is None else self.elastic.active_level()

    def wants_grad(self, *inputs: torch.Tensor) -> bool:
        """Whether autograd would record this call (the native path records nothing)."""
        if not torch.is_grad_enabled():
            return False
        return any(t.requires_grad for t in inputs) or any(p.requires_grad for p in self.parameters)


_FORWARD_HOOKS = attrgetter("_forward_hooks")
_PRE_HOOKS = attrgetter("_forward_pre_hooks")


def _active_hooks(module: nn.Module) -> bool:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    # transformers installs output-capture hooks once and leaves them in place; they do nothing unless
    # a call asks for hidden states or attentions, and such calls are sent to the module path anyway
    return any(getattr(h, "__name__", "") != "output_capturing_hook" for h in hooks)


@dataclass
class StackPlan:
    """A native Stack and what the runtime needs around it."""

    stack: Any = field(repr=False)  # _native.Stack
    roles: BlockRoles = field(repr=False)
    entry: nn.Module = field(repr=False)  # the module whose forward loops over the blocks
    guard: PlanGuard = field(repr=False)
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    layers: int
    rotary: nn.Module | None = field(default=None, repr=False)
    final_norm: bool = False
    keep: list[Any] = field(default_factory=list, repr=False)  # native objects the Stack points into
    moe: Any = field(default=None, repr=False)  # moe_plan.MoeRouting: the MoE blocks' top_p and counts


class _Refused(Exception):
    """Why a model has no native plan (the message)."""


def _member(block: nn.Module, path: str, prefix: str, guard: PlanGuard) -> nn.Module:
    module = block
    for part in path.split("."):  # every level watched: replacing `attention` replaces what is under it
        if not isinstance(module._modules.get(part), nn.Module):
            raise _Refused(f"{prefix}.{path} does not exist")
        module = guard.watch(module._modules, part)
    return module


def _float_tensor(t: torch.Tensor | None, what: str) -> torch.Tensor | None:
    if t is None:
        return None
    if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
        raise _Refused(f"{what} is not a contiguous float32 CPU tensor")
    return t.detach()


def _norm(lib: Any, module: nn.Module, name: str, width: int, guard: PlanGuard) -> Any:
    """A _native.Norm for a LayerNorm or an RMSNorm of `width` features."""
    params = guard.watch(module.__dict__, "_parameters")
    if isinstance(module, nn.LayerNorm):
        if tuple(module.normalized_shape) != (width,) or not module.elementwise_affine:
            raise _Refused(f"{name} is not an affine LayerNorm over {width} features")
        weight = _float_tensor(guard.watch(params, "weight"), f"{name}.weight")
        bias = _float_tensor(guard.watch(params, "bias"), f"{name}.bias") if params.get("bias") is not None else None
        guard.parameters += [p for p in (params.get("weight"), params.get("bias")) if p is not None]
        return lib.Norm(weight, bias, float(module.eps), False)
    eps = getattr(module, "variance_epsilon", None)
    if isinstance(module, nn.RMSNorm):
        eps = module.eps if module.eps is not None else torch.finfo(torch.float32).eps
    elif not type(module).__name__.endswith("RMSNorm") or eps is None:
        raise _Refused(f"{name} is a {type(module).__name__}, not a LayerNorm or an RMSNorm")
    weight = params.get("weight")
    if weight is None or tuple(weight.shape) != (width,):
        raise _Refused(f"{name} has no weight of {width} features")
    guard.watch(params, "weight")
    guard.parameters.append(weight)
    return lib.Norm(_float_tensor(weight, f"{name}.weight"), None, float(eps), True)


def _projection(lib: Any, module: nn.Module, name: str, guard: PlanGuard) -> Any:
    if not isinstance(module, SparseLinear):
        raise _Refused(f"{name} is a {type(module).__name__}, not a packed layer with a native kernel")
    packed = guard.watch(module.__dict__, "packed")
    if isinstance(module, ElasticLinear):
        return _elastic_projection(lib, module, name, guard)
    handle = native_handle(packed)
    if handle is None:
        raise _Refused(f"{name}: no native kernel for {packed.name} / {packed.dtype}")
    bias = guard.watch(module._buffers, "bias") if "bias" in module._buffers else None
    # thresholds installed later make the plan stale (the buffer is watched either way)
    return lib.Projection(handle, _float_tensor(bias, f"{name}.bias"), guard.slot(module))


def float_projection(lib: Any, weight: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[Any, tuple]:
    """A float32 weight [out, in] as a `_native.Projection` run by the float kernel, and what it points into.

    The kernel reads a masked stream: here every mask bit is set and the values are the weight's own
    storage (no copy); the mask costs one bit per weight. For small float layers the plans run beside
    packed ones: an LM head left in float, a MoE router, a shared expert's gate.

    Example:
        >>> lib = native.module()
        >>> proj, keep = float_projection(lib, torch.ones(2, 4)) if lib is not None else (None, ())
    """
    weight = weight.detach()
    if weight.dtype != torch.float32 or not weight.is_contiguous() or weight.dim() != 2:
        raise ValueError("a float32 contiguous [out, in] weight is needed")
    out_features, in_features = weight.shape
    mask = mask_to_bits(torch.ones(out_features, in_features, dtype=torch.bool))
    offsets = torch.arange(out_features + 1, dtype=torch.int64) * in_features
    handle = lib.masked_linear(mask, weight.reshape(-1), offsets, in_features, panel_limit=0)
    bias = None if bias is None else bias.detach().float().contiguous()
    return lib.Projection(handle, bias), (mask, offsets, weight, bias)


def _elastic_projection(lib: Any, module: ElasticLinear, name: str, guard: PlanGuard) -> Any:
    """An elastic layer's projection: one handle for every level, each level's bias (its shift added)."""
    handle = elastic_native_plan(module.packed)
    if handle is None:
        raise _Refused(f"{name}: no native kernel for elastic / {module.packed.dtype}")
    if guard.slot(module) >= 0:
        raise _Refused(f"{name}: activation sparsity on an elastic layer has no native kernel")
    if "bias" in module._buffers:
        guard.watch(module._buffers, "bias")  # a replaced bias (bias correction) makes new level biases
    guard.levels_of(module)
    biases = [module.level_bias(i) for i in range(module.packed.n_levels)]
    if all(b is None for b in biases):
        return lib.Projection(handle, None)
    return lib.Projection(handle, None, -1, [_float_tensor(b, f"{name} level bias") for b in biases])


def _activation(config: Any, roles: BlockRoles) -> int:
    for field_name in roles.activation:
        name = getattr(config, field_name, None)
        if name is not None:
            if not isinstance(name, str) or name not in ACTIVATION_NAMES:
                raise _Refused(f"activation {name!r} has no native kernel")
            return activation_code(ACTIVATION_NAMES[name])
    raise _Refused("the config names no activation")


def _check_config(config: Any, roles: BlockRoles) -> None:
    if getattr(config, "is_decoder", False) and not roles.pre_norm or getattr(config, "add_cross_attention", False):
        raise _Refused("cross-attention / decoder use of an encoder family")
    if getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        raise _Refused(f"position_embedding_type {config.position_embedding_type!r}")
    if roles.pre_norm and getattr(config, "sliding_window", None) is not None and (
            getattr(config, "use_sliding_window", True) is not False):
        raise _Refused("sliding-window attention")
    if getattr(config, "_attn_implementation", "sdpa") == "flex_attention":
        raise _Refused("flex attention")
    if getattr(config, "clip_qkv", None) is not None:
        raise _Refused(f"clip_qkv {config.clip_qkv} (clamped projections)")


def _entry_of(model: nn.Module, container: nn.Module) -> tuple[str, nn.Module]:
    """The base model (transformers' `base_model`: the model itself, or the one under a task head)."""
    entry = getattr(model, "base_model", model)
    if not isinstance(entry, nn.Module) or not any(m is container for m in entry.modules()):
        raise _Refused("the blocks are not inside the base model")
    name = next(n for n, m in model.named_modules() if m is entry)
    return name, entry


def build_plan(model: nn.Module) -> StackPlan | str:
    """The native plan of `model`'s transformer blocks, or why there is none (a sentence).

    See the module docstring for what is refused. The plan points into the model's own tensors.
    """
    lib = native.module()
    if lib is None or not hasattr(lib, "Stack"):
        return "the native extension is not available"
    config = getattr(model, "config", None)
    roles = roles_for(getattr(config, "model_type", None))
    if roles is None:
        return f"no native block plan for model_type {getattr(config, 'model_type', None)!r}"
    try:
        return _build(lib, model, config, roles)
    except _Refused as why:
        return str(why)


def _build(lib: Any, model: nn.Module, config: Any, roles: BlockRoles) -> StackPlan:
    _check_config(config, roles)
    layout = find_layout(model)
    if not layout.blocks or layout.blocks[0][0] == "":
        raise _Refused("the layout adapter found no transformer blocks")
    names = [name for name, _ in layout.blocks]
    guard = PlanGuard()
    container = model.get_submodule(names[0].rsplit(".", 1)[0])
    entry_name, entry = _entry_of(model, container)
    for path in (roles.embeddings, roles.pooler, roles.position_bias):
        if path is not None and path != roles.pooler and not isinstance(getattr(entry, path, None), nn.Module):
            raise _Refused(f"the base model has no {path}")
    blocks = [guard.watch(container._modules, str(i)) for i in range(len(container))]
    first = blocks[0]
    q = _member(first, roles.q, names[0], guard)
    heads = int(config.num_attention_heads)
    hidden = int(q.in_features)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    k = _member(first, roles.k, names[0], guard)
    if q.out_features != heads * head_dim or k.out_features % head_dim:
        raise _Refused(f"projection sizes do not fit {heads} heads of {head_dim}")
    kv_heads = k.out_features // head_dim
    moe_layers = _moe_layers(model, roles)
    dense = [b for b in blocks if not _is_moe(b, roles, moe_layers)]
    # the dense MLP's width (1 where every block is a MoE block: they keep their own buffers)
    intermediate = int(_member(dense[0], roles.up, names[blocks.index(dense[0])], guard).out_features) if dense else 1
    scale = float(getattr(q_parent(first, roles), "scaling", head_dim ** -0.5))
    stack = lib.Stack(hidden, heads, kv_heads, head_dim, intermediate, roles.pre_norm, scale)
    act = _activation(config, roles)
    keep: list[Any] = []
    routing = None
    for name, block in zip(names, blocks):
        linears = roles.linears()
        extra: dict[str, Any] = {}
        if _is_moe(block, roles, moe_layers):
            from .moe_plan import MoeRouting, moe_block

            _member(block, roles.moe, name, guard)  # type: ignore[arg-type]
            layer = moe_layers[id(block.get_submodule(roles.moe))]  # type: ignore[arg-type]
            extra["moe"], held = moe_block(lib, layer, guard)
            keep += held
            routing = routing or MoeRouting(stack)
            routing.experts.append(layer.experts)
            linears = {role: path for role, path in linears.items() if role in ("q", "k", "v", "o")}
        projections = {role: _projection(lib, _member(block, path, name, guard), f"{name}.{path}", guard)
                       for role, path in linears.items()}
        norms = {role: _norm(lib, _member(block, path, name, guard), f"{name}.{path}", hidden, guard)
                 for role, path in (("norm1", roles.norm1), ("norm2", roles.norm2))}
        qk_width = {"q_norm": heads * head_dim, "k_norm": kv_heads * head_dim} if roles.qk_norm_full else {}
        for role, path in (("q_norm", roles.q_norm), ("k_norm", roles.k_norm)):
            if path is not None:
                width = qk_width.get(role, head_dim)
                norms[role] = _norm(lib, _member(block, path, name, guard), f"{name}.{path}", width, guard)
        try:
            stack.add_block(**norms, **projections, **extra, activation=act, qk_norm_full=roles.qk_norm_full)
        except ValueError as exc:
            raise _Refused(f"{name}: {exc}") from None
        keep += [*projections.values(), *norms.values()]
        guard.modules += list(block.modules())
    final = False
    if roles.final_norm is not None:
        norm = _member(entry, roles.final_norm, entry_name or "model", guard)
        stack.set_final_norm(_norm(lib, norm, f"{entry_name}.{roles.final_norm}", hidden, guard))
        guard.modules.append(norm)
        final = True
    rotary = _member(entry, roles.rotary, entry_name or "model", guard) if roles.rotary is not None else None
    return StackPlan(stack=stack, roles=roles, entry=entry, guard=guard, heads=heads, kv_heads=kv_heads,
                     head_dim=head_dim, hidden=hidden, layers=len(blocks), rotary=rotary, final_norm=final, keep=keep,
                     moe=routing)


def _moe_layers(model: nn.Module, roles: BlockRoles) -> dict[int, Any]:
    """The model's MoE layers by their block's id (empty for families without MoE blocks)."""
    if roles.moe is None:
        return {}
    from ..models.moe import find_moe_layers

    return {id(layer.block): layer for layer in find_moe_layers(model)}


def _is_moe(block: nn.Module, roles: BlockRoles, moe_layers: dict[int, Any]) -> bool:
    if roles.moe is None:
        return False
    member = block
    for part in roles.moe.split("."):
        member = member._modules.get(part)  # type: ignore[assignment]
        if member is None:
            return False
    return id(member) in moe_layers


def q_parent(block: nn.Module, roles: BlockRoles) -> nn.Module:
    """The attention module holding the query projection (its `scaling`, where it has one, is the scale).

    Example:
        >>> from sparsepress.models.roles import roles_for
        >>> type(q_parent(torch.nn.Module(), roles_for("bert"))).__name__
        'Module'
    """
    path = roles.q.rsplit(".", 1)[0]
    try:
        return block.get_submodule(path)
    except AttributeError:
        return block


__all__ = ["ACTIVATION_NAMES", "PlanGuard", "StackPlan", "build_plan", "q_parent"]
