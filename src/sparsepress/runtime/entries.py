"""The base model's forward, taken over by the native Stack: one native call for all its blocks.

Two call conventions cover the supported families (`BlockRoles.entry`):
  encoder: `forward(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, ...)`; the
           model's own embeddings (and pooler, MPNet's relative position bias) run as modules, the
           padding mask goes to the attention kernel as one additive row per sequence.
  decoder: LLaMA-style `forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)`
           without a cache: embedding lookup, rotary embeddings and the causal mask by the model's own
           modules and functions, the blocks and the final norm natively (MoE decoders too: their
           routers and experts are blocks of the Stack; router logits asked for go to the modules).
Whatever a runner does not cover exactly (hidden states or attentions asked for, a cache, 3-D/4-D
masks, training, autograd, hooks on the blocks, torch.compile, activation sparsity switched on, an
argument it does not know) goes to the model's own forward unchanged.

`NativeForward` is the callable put in the base model's `forward` slot (the instance attribute
accelerate's hooks use too); `NativeForward.original` is the class's forward.

Example:
    >>> sorted(RUNNERS)
    ['decoder', 'encoder']
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .. import native
from ..attention import _additive_mask
from .plan import StackPlan

_is_compiling = torch.compiler.is_compiling
# arguments a runner may see set and still run natively (it honours them, or they change nothing here)
_READ = {"input_ids", "attention_mask", "token_type_ids", "position_ids", "inputs_embeds", "return_dict",
         "output_attentions", "output_hidden_states", "use_cache"}


def _output_collector() -> Any:
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions pass output_* flags down as arguments
        return None
    return _active_collector


_COLLECTOR = _output_collector()


class NativeForward:
    """The base model's forward: the native Stack where the call fits, else `original`.

    `enabled = False` sends every call to `original` (what tests compare against). A deep copy of
    the model gets the plain forward back: the plan points into the original model's tensors.
    """

    def __init__(self, plan: StackPlan, original: Callable[..., Any]):
        self.plan, self.original, self.enabled = plan, original, True
        self.native_calls = 0  # calls the Stack ran (tests, the install check)
        self.runner = RUNNERS[plan.roles.entry]
        params = list(inspect.signature(original).parameters.values())
        self.positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.enabled and len(args) <= len(self.positional) and self._fits():
            call = dict(zip(self.positional, args))
            if not (call.keys() & kwargs.keys()):
                call.update(kwargs)
                result = self.runner(self.plan, call)
                if result is not None:
                    self.native_calls += 1
                    return result
        return self.original(*args, **kwargs)

    def _fits(self) -> bool:
        plan = self.plan
        return (not plan.entry.training and not _is_compiling() and plan.guard.current() and not plan.guard.hooked()
                and not (_COLLECTOR is not None and _COLLECTOR.get()))

    def __deepcopy__(self, memo: dict) -> Any:
        entry = memo.get(id(self.plan.entry))
        return self.original if entry is None else plain_forward(entry)

    def __reduce__(self):  # a pickled model (torch.save) gets the plain forward back
        return plain_forward, (self.plan.entry,)


def plain_forward(module: nn.Module) -> Callable[..., Any]:
    """The class's own forward bound to `module` (what a copy or unpickled model runs)."""
    return type(module).forward.__get__(module)


def _flag(call: dict[str, Any], name: str, config: Any) -> bool:
    value = call.get(name)
    return bool(getattr(config, name, False) if value is None else value)


def _declines(plan: StackPlan, call: dict[str, Any], config: Any) -> bool:
    """Whether the call asks for something the native path does not give: an unknown argument set,
    hidden states or attentions, tuples where the config does not ask for them anyway."""
    return (any(value is not None and value is not False for key, value in call.items() if key not in _READ)
            or _flag(call, "output_attentions", config) or _flag(call, "output_hidden_states", config))


def _hidden_ok(plan: StackPlan, hidden: Any) -> bool:
    return (isinstance(hidden, torch.Tensor) and hidden.dtype == torch.float32 and hidden.is_cpu and hidden.dim() == 3
            and hidden.shape[-1] == plan.hidden and hidden.numel() > 0 and not plan.guard.wants_grad(hidden))


def _run_stack(plan: StackPlan, hidden: torch.Tensor, mask: torch.Tensor | None, strides: list[int], causal: bool,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None, final_norm: bool = False) -> torch.Tensor:
    batch, seq, width = hidden.shape
    x = hidden if hidden.is_contiguous() else hidden.contiguous()
    out = native.output_tensor(batch, seq, width)
    cos = sin = None
    if rotary is not None:
        cos, sin = (t.expand(batch, seq, plan.head_dim).float().contiguous() for t in rotary)
    thresholds = plan.guard.thresholds()  # held until the call returns
    top_p = plan.moe.top_p() if plan.moe is not None else None
    plan.stack.forward_raw(x.data_ptr(), out.data_ptr(), batch, seq, 0 if mask is None else mask.data_ptr(), strides,
                           causal, 0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
                           final_norm, torch.get_num_threads(), 0 if thresholds is None else thresholds.data_ptr(),
                           plan.guard.level(), 0 if top_p is None else top_p.data_ptr())
    if plan.moe is not None:
        plan.moe.flush()
    return out


def _key_mask(mask: Any, batch: int, seq: int) -> tuple[torch.Tensor | None, list[int]] | None:
    """A [batch, seq] keep-mask (1 / True keeps a key) as one additive row per sequence, broadcast over
    heads and queries (as transformers' bidirectional masks); None when it is not such a mask."""
    if mask is None:
        return None, [0, 0, 0]
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != (batch, seq) or not mask.is_cpu:
        return None
    if bool(mask.all()):
        return None, [0, 0, 0]
    additive = torch.zeros(batch, seq).masked_fill_(mask == 0, float("-inf"))
    return additive, [seq, 0, 0]


def _finish(plan: StackPlan, config: Any, call: dict[str, Any], **fields: Any) -> Any:
    import transformers.modeling_outputs as outputs

    result = getattr(outputs, plan.roles.output)(**fields)
    return_dict = call.get("return_dict")
    return_dict = getattr(config, "return_dict", True) if return_dict is None else return_dict
    return result if return_dict else result.to_tuple()


def run_encoder(plan: StackPlan, call: dict[str, Any]) -> Any:
    """An encoder base model (BERT, RoBERTa, XLM-R, MPNet, DistilBERT): embeddings, blocks, pooler."""
    entry, roles = plan.entry, plan.roles
    config = getattr(entry, "config", None)
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    if _declines(plan, call, config) or call.get("use_cache") or (ids is None) == (embeds is None):
        return None
    if call.get("token_type_ids") is not None and not roles.token_types:
        return None
    args = {"input_ids": ids, "position_ids": call.get("position_ids"), "inputs_embeds": embeds}
    if roles.token_types:
        args["token_type_ids"] = call.get("token_type_ids")
    hidden = getattr(entry, roles.embeddings)(**args)
    if not _hidden_ok(plan, hidden):
        return None
    batch, seq, _ = hidden.shape
    keys = _key_mask(call.get("attention_mask"), batch, seq)
    if keys is None:
        return None
    mask, strides = keys
    if roles.position_bias is not None:  # MPNet: [batch, heads, seq, seq] added to the scores
        bias = getattr(entry, roles.position_bias).compute_position_bias(hidden)
        mask = bias if mask is None else bias + mask.view(batch, 1, 1, seq)
        strides = list(mask.stride()[:3])
    out = _run_stack(plan, hidden, mask, strides, False)
    fields: dict[str, Any] = {"last_hidden_state": out}
    if roles.pooler is not None:
        pooler = getattr(entry, roles.pooler, None)
        fields["pooler_output"] = pooler(out) if pooler is not None else None
    return _finish(plan, config, call, **fields)


def causal_mask(entry: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor | None:
    """The mask a LLaMA-style base model builds for this call without a cache (its own module's
    `create_causal_mask`): None when plain causality covers it, else [batch, 1, q, k] (bool or float)."""
    make = sys.modules[type(entry).__module__].create_causal_mask
    cache = "cache" if "cache" in inspect.signature(make).parameters else "past_key_values"
    return make(config=entry.config, inputs_embeds=embeds, attention_mask=attention_mask, **{cache: None},
                position_ids=position_ids)


def run_decoder(plan: StackPlan, call: dict[str, Any]) -> Any:
    """A LLaMA-style base model without a cache: embeddings, rotary, mask, blocks, final norm."""
    entry, roles = plan.entry, plan.roles
    config = entry.config
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    mask, positions = call.get("attention_mask"), call.get("position_ids")
    use_cache = call.get("use_cache")
    use_cache = getattr(config, "use_cache", False) if use_cache is None else use_cache
    if (_declines(plan, call, config) or use_cache or (ids is None) == (embeds is None)
            or call.get("token_type_ids") is not None
            or (mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2))):
        return None
    if embeds is None:
        embeds = getattr(entry, roles.embeddings)(ids)
    if not _hidden_ok(plan, embeds):
        return None
    batch, seq, _ = embeds.shape
    if positions is None:
        positions = torch.arange(seq).unsqueeze(0)
    built = causal_mask(entry, embeds, mask, positions)
    if built is not None and not (isinstance(built, torch.Tensor) and built.dim() == 4):
        return None
    additive = _additive_mask(built, (batch, plan.heads, seq, seq)) if built is not None else None
    strides = list(additive.stride()[:3]) if additive is not None else [0, 0, 0]
    rotary = getattr(entry, roles.rotary)(embeds, position_ids=positions) if roles.rotary is not None else None
    out = _run_stack(plan, embeds, additive, strides, built is None, rotary, final_norm=plan.final_norm)
    return _finish(plan, config, call, last_hidden_state=out)


RUNNERS: dict[str, Callable[[StackPlan, dict[str, Any]], Any]] = {"encoder": run_encoder, "decoder": run_decoder}

__all__ = ["RUNNERS", "NativeForward", "causal_mask", "plain_forward"]
