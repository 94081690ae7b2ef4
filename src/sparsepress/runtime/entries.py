"""The module whose forward loops over the blocks, taken over by the native Stack: one call per model.

Each family's looping module has its own call convention (`BlockRoles.entry`): BERT-style encoders
(`encoder(hidden_states, attention_mask, ...)`), MPNet's encoder (adds its relative position bias),
DistilBERT's `transformer`, and LLaMA-style base models (embedding lookup, rotary embeddings, mask and
final norm around the blocks). A runner reads the call; whatever it does not cover exactly (hidden
states or attentions asked for, a cache, cross-attention, training, autograd, hooks on the blocks,
torch.compile, an unknown argument) goes to the module's own forward unchanged.

`NativeForward` is the callable put in the looping module's `forward` slot (the instance attribute
accelerate's hooks use too); `NativeForward.original` is the class's forward.

Example:
    >>> sorted(RUNNERS)
    ['bert_encoder', 'distilbert_transformer', 'llama_model', 'mpnet_encoder']
"""

from __future__ import annotations

import inspect
import sys
from typing import Any, Callable

import torch
from torch import nn

from .. import native
from ..attention import _additive_mask
from .plan import StackPlan

_is_compiling = torch.compiler.is_compiling
# arguments a runner may see set without leaving the native path (read and honoured, or inert)
_INERT = {"return_dict", "position_ids", "output_attentions", "output_hidden_states", "use_cache", "cache"}


def _collecting_outputs() -> bool:
    """Whether transformers is collecting hidden states or attentions of the running forward."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions pass output_* flags down as arguments
        return False
    return bool(_active_collector.get())


class NativeForward:
    """The forward of a block-looping module: the native Stack where the call fits, else `original`.

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
        if self.enabled and not _is_compiling() and self._fits():
            call = dict(zip(self.positional, args)) if len(args) <= len(self.positional) else None
            if call is not None and not (call.keys() & kwargs.keys()):
                call.update(kwargs)
                result = self.runner(self.plan, call)
                if result is not None:
                    self.native_calls += 1
                    return result
        return self.original(*args, **kwargs)

    def _fits(self) -> bool:
        plan = self.plan
        return (not plan.entry.training and plan.guard.current() and not plan.guard.hooked()
                and not _collecting_outputs())

    def __deepcopy__(self, memo: dict) -> Any:
        entry = memo.get(id(self.plan.entry))
        if entry is None:
            return self.original
        return type(entry).forward.__get__(entry)

    def __reduce__(self):  # pickled models (torch.save) get the plain forward back
        return getattr, (self.plan.entry.__class__, "forward")


def _flag(call: dict[str, Any], name: str, config: Any) -> bool:
    value = call.get(name)
    return bool(getattr(config, name, False) if value is None else value)


def _unknown(call: dict[str, Any], known: set[str]) -> bool:
    """Whether the call sets an argument the runner does not handle."""
    return any(value is not None and value is not False for key, value in call.items() if key not in known)


def _mask_view(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, list[int]]:
    """(additive float32 mask viewed as `shape`, its [b, h, s] strides), from a bool or float mask."""
    if mask is None:
        return None, [0, 0, 0]
    additive = _additive_mask(mask, shape)
    assert additive is not None
    return additive, list(additive.stride()[:3])


def _run_stack(plan: StackPlan, hidden: torch.Tensor, mask: torch.Tensor | None, causal: bool,
               rotary: tuple[torch.Tensor, torch.Tensor] | None = None, final_norm: bool = False) -> torch.Tensor:
    batch, seq, width = hidden.shape
    x = hidden if hidden.is_contiguous() else hidden.contiguous()
    view, strides = _mask_view(mask, (batch, plan.heads, seq, seq))
    out = native.output_tensor(batch, seq, width)
    cos = sin = None
    if rotary is not None:
        cos, sin = (t.expand(batch, seq, plan.head_dim).float().contiguous() for t in rotary)
    plan.stack.forward_raw(x.data_ptr(), out.data_ptr(), batch, seq, 0 if view is None else view.data_ptr(), strides,
                           causal, 0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
                           final_norm, torch.get_num_threads())
    return out


def _hidden_ok(plan: StackPlan, hidden: Any) -> bool:
    return (isinstance(hidden, torch.Tensor) and hidden.dtype == torch.float32 and hidden.is_cpu and hidden.dim() == 3
            and hidden.shape[-1] == plan.hidden and hidden.numel() > 0 and not plan.guard.wants_grad(hidden))


def _mask_ok(mask: Any) -> bool:
    return mask is None or (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.is_cpu)


def run_bert_encoder(plan: StackPlan, call: dict[str, Any]) -> Any:
    """BertEncoder-style `forward(hidden_states, attention_mask, encoder_hidden_states, ...)`."""
    from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

    hidden, mask = call.get("hidden_states"), call.get("attention_mask")
    config = plan.entry.config if hasattr(plan.entry, "config") else None
    if (not _hidden_ok(plan, hidden) or not _mask_ok(mask) or _unknown(call, {"hidden_states", "attention_mask", *_INERT})
            or call.get("cache") is not None or call.get("past_key_values") is not None or call.get("use_cache")
            or _flag(call, "output_attentions", config) or _flag(call, "output_hidden_states", config)):
        return None
    return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=_run_stack(plan, hidden, mask, False))


def run_mpnet_encoder(plan: StackPlan, call: dict[str, Any]) -> Any:
    """MPNetEncoder `forward(hidden_states, attention_mask, output_attentions, output_hidden_states, return_dict)`:
    its relative position bias joins the mask."""
    from transformers.modeling_outputs import BaseModelOutput

    hidden, mask = call.get("hidden_states"), call.get("attention_mask")
    if (not _hidden_ok(plan, hidden) or not _mask_ok(mask) or call.get("output_attentions")
            or call.get("output_hidden_states") or _unknown(call, {"hidden_states", "attention_mask", *_INERT})):
        return None
    batch, seq, _ = hidden.shape
    bias = plan.entry.compute_position_bias(hidden)  # [batch, heads, seq, seq]
    if mask is not None:
        additive = _additive_mask(mask, (batch, plan.heads, seq, seq))
        bias = bias + additive
    out = _run_stack(plan, hidden, bias, False)
    return BaseModelOutput(last_hidden_state=out) if call.get("return_dict") else (out,)


def run_distilbert_transformer(plan: StackPlan, call: dict[str, Any]) -> Any:
    """DistilBERT's `Transformer.forward(hidden_states, attention_mask, **kwargs)`."""
    from transformers.modeling_outputs import BaseModelOutput

    hidden, mask = call.get("hidden_states"), call.get("attention_mask")
    config = getattr(plan.entry, "config", None)
    if (not _hidden_ok(plan, hidden) or not _mask_ok(mask) or _unknown(call, {"hidden_states", "attention_mask", *_INERT})
            or _flag(call, "output_attentions", config) or _flag(call, "output_hidden_states", config)):
        return None
    return BaseModelOutput(last_hidden_state=_run_stack(plan, hidden, mask, False))


def causal_mask(entry: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> torch.Tensor | None:
    """The mask a LLaMA-style base model would build for this call without a cache (its own module's
    `create_causal_mask`): None when plain causality covers it, else [batch, 1, q, k] (bool or float)."""
    make = getattr(sys.modules[type(entry).__module__], "create_causal_mask")
    params = inspect.signature(make).parameters
    cache_name = "cache" if "cache" in params else "past_key_values"
    return make(config=entry.config, inputs_embeds=embeds, attention_mask=attention_mask,
                **{cache_name: None}, position_ids=position_ids)


def run_llama_model(plan: StackPlan, call: dict[str, Any]) -> Any:
    """LlamaModel-style `forward(input_ids, attention_mask, position_ids, cache, inputs_embeds, use_cache)`
    without a cache: embedding lookup and rotary embeddings by the model's own modules, then the blocks
    and the final norm natively."""
    from transformers.modeling_outputs import BaseModelOutputWithPast

    entry = plan.entry
    config = entry.config
    ids, embeds = call.get("input_ids"), call.get("inputs_embeds")
    mask, positions = call.get("attention_mask"), call.get("position_ids")
    use_cache = call.get("use_cache")
    use_cache = getattr(config, "use_cache", False) if use_cache is None else use_cache
    known = {"input_ids", "inputs_embeds", "attention_mask", *_INERT}
    if (use_cache or call.get("cache") is not None or call.get("past_key_values") is not None
            or _unknown(call, known) or _flag(call, "output_attentions", config)
            or _flag(call, "output_hidden_states", config) or call.get("return_dict") is False
            or (ids is None) == (embeds is None) or (mask is not None and (not isinstance(mask, torch.Tensor)
                                                                            or mask.dim() != 2))):
        return None
    if embeds is None:
        embeds = entry.embed_tokens(ids)
    if not _hidden_ok(plan, embeds):
        return None
    seq = embeds.shape[1]
    if positions is None:
        positions = torch.arange(seq).unsqueeze(0)
    built = causal_mask(entry, embeds, mask, positions)
    if not _mask_ok(built):
        return None
    rotary = plan.rotary(embeds, position_ids=positions) if plan.rotary is not None else None
    out = _run_stack(plan, embeds, built, built is None, rotary, final_norm=plan.final_norm)
    return BaseModelOutputWithPast(last_hidden_state=out)


RUNNERS: dict[str, Callable[[StackPlan, dict[str, Any]], Any]] = {
    "bert_encoder": run_bert_encoder,
    "mpnet_encoder": run_mpnet_encoder,
    "distilbert_transformer": run_distilbert_transformer,
    "llama_model": run_llama_model,
}

__all__ = ["NativeForward", "RUNNERS", "causal_mask"]
