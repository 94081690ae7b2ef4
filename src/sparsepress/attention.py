"""Scaled dot-product attention on the native kernels (fp32), and its hook into transformers models.

At 32 sequences of 64 tokens, torch's SDPA kernel spends ~22 ms of a ~100 ms forward of a compressed
all-MiniLM-L6-v2 on attention whose arithmetic is a tenth of that (12 heads of 32 dims, 384 tiny
matrix pairs per layer). `attention` runs it on the native kernels instead: per (batch, head) pair,
keys transposed once, a streaming softmax over key chunks, nothing of size Sq x Sk stored.
`reference_attention` is the same math in plain torch, and the test suite holds the two together
(and the reference to torch's SDPA).

`use_native_attention(model)` switches a transformers model that runs SDPA to it through
transformers' own attention registry (`AttentionInterface`), so any architecture that dispatches
attention there is covered, encoders and decoders (grouped-query heads included); what the kernel
does not cover (dropout while training, position biases, soft-capping, sinks, attention weights
asked for, other dtypes or devices) goes to transformers' SDPA function unchanged.

Example:
    >>> import torch
    >>> q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    >>> out = attention(q, k, v)
    >>> out.shape, torch.allclose(out, reference_attention(q, k, v), atol=1e-5)
    (torch.Size([2, 5, 4, 8]), True)
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from . import native

ATTENTION_NAME = "sparsepress"
_is_compiling = torch.compiler.is_compiling
# transformers' attention arguments the kernel has no equivalent for: their presence sends a call to SDPA
_UNSUPPORTED_KWARGS = ("position_bias", "softcap", "s_aux", "sinks")


def _shapes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """(batch, heads, kv_heads, sq, sk, d), or ValueError naming the tensor that does not fit."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"attention takes [batch, heads, seq, dim] tensors; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}")
    batch, heads, sq, d = query.shape
    if key.shape != value.shape:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    if key.shape[0] != batch or key.shape[3] != d:
        raise ValueError(f"key {tuple(key.shape)} does not fit query {tuple(query.shape)} (batch and head dim)")
    kv_heads, sk = key.shape[1], key.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query's {heads} heads are not a multiple of key's {kv_heads}")
    return batch, heads, kv_heads, sq, sk, d


def _additive_mask(mask: torch.Tensor | None, shape: tuple[int, int, int, int]) -> torch.Tensor | None:
    """A float32 additive mask viewed as [batch, heads, sq, sk] (broadcast dims stride 0); bool: True keeps."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, -math.inf)
    elif mask.dtype != torch.float32:
        mask = mask.float()
    try:
        mask = mask.expand(shape)
    except RuntimeError:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not broadcast to {shape}") from None
    return mask if mask.stride(-1) == 1 or shape[-1] <= 1 else mask.contiguous()


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        mask: torch.Tensor | None = None, scale: float | None = None,
                        causal: bool = False) -> torch.Tensor:
    """softmax(scale q k^T + mask) v in plain torch: [B, H, Sq, D] queries -> [B, Sq, H, D] outputs.

    Keys and values may have fewer heads (grouped-query attention: query head h reads key head
    h // (H / H_kv)); `mask` is additive (float) or keep-where-True (bool), broadcast to
    [B, H, Sq, Sk]; `causal` hides key j from query i when j > i. A query that sees no key outputs zeros.

    Example:
        >>> q = k = v = torch.eye(2).reshape(1, 1, 2, 2)
        >>> reference_attention(q, k, v, causal=True)[0, :, 0].tolist()
        [[1.0, 0.0], [0.3302..., 0.6697...]]
    """
    batch, heads, kv_heads, sq, sk, d = _shapes(query, key, value)
    scale = d ** -0.5 if scale is None else scale
    if sk == 0:
        return query.new_zeros((batch, sq, heads, d), dtype=torch.float32)
    if kv_heads != heads:
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    scores = (query.float() * scale) @ key.float().transpose(-1, -2)
    additive = _additive_mask(mask, (batch, heads, sq, sk))
    if additive is not None:
        scores = scores + additive
    if causal:
        hidden = torch.ones(sq, sk, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(hidden, -math.inf)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    out = (weights @ value.float()) / torch.where(total > 0, total, torch.ones_like(total))
    return out.transpose(1, 2).contiguous()


def _run_native(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scale: float, causal: bool) -> torch.Tensor:
    lib = native.module()
    assert lib is not None
    batch, heads, kv_heads, sq, sk, d = _shapes(query, key, value)
    if 0 in (batch, heads, sq, sk, d):  # nothing to attend to (empty tensors have no address)
        return torch.zeros(batch, sq, heads, d, dtype=torch.float32)
    query, key, value = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, key, value))
    mask = _additive_mask(mask, (batch, heads, sq, sk))
    out = native.output_tensor(batch, sq, heads, d)
    strides = [*query.stride()[:3], *key.stride()[:3], *value.stride()[:3],
               out.stride(0), out.stride(2), out.stride(1), *(mask.stride()[:3] if mask is not None else (0, 0, 0))]
    lib.attention_raw(query.data_ptr(), key.data_ptr(), value.data_ptr(), 0 if mask is None else mask.data_ptr(),
                      out.data_ptr(), [batch, heads, kv_heads, sq, sk, d], strides, float(scale), bool(causal),
                      torch.get_num_threads())
    return out


@torch.library.custom_op("sparsepress::attention", mutates_args=())
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                  scale: float, causal: bool) -> torch.Tensor:
    """The native attention as torch.compile and torch.export see it."""
    return _run_native(query, key, value, mask, scale, causal)


@_attention_op.register_fake
def _(query, key, value, mask, scale, causal):
    return query.new_empty((query.shape[0], query.shape[2], query.shape[1], query.shape[3]), dtype=torch.float32)


def native_attention_supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              mask: torch.Tensor | None = None) -> bool:
    """Whether `attention` runs these on the native kernel: float32 CPU q/k/v, a CPU mask, no autograd.

    Example:
        >>> t = torch.ones(1, 1, 1, 1)
        >>> native_attention_supports(t, t, t.half())
        False
    """
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return (native.native_available() and not grad and (mask is None or mask.is_cpu)
            and all(t.is_cpu and t.dtype == torch.float32 for t in (query, key, value)))


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
              scale: float | None = None, causal: bool = False) -> torch.Tensor:
    """softmax(scale q k^T + mask) v -> [B, Sq, H, D], on the native kernel where it applies.

    Arguments as `reference_attention` (which runs otherwise: other dtypes or devices, autograd,
    no native build). Strided inputs are fine as long as the head dimension is contiguous.

    Example:
        >>> q = torch.randn(1, 2, 3, 4)
        >>> torch.allclose(attention(q, q, q, causal=True), reference_attention(q, q, q, causal=True), atol=1e-5)
        True
    """
    d = query.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    if not native_attention_supports(query, key, value, mask):
        return reference_attention(query, key, value, mask, scale, causal)
    if _is_compiling():
        return _attention_op(query, key, value, mask, scale, causal)
    return _run_native(query, key, value, mask, scale, causal)


def transformers_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                           is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature on `attention`, SDPA's semantics; SDPA itself otherwise.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> out, _ = transformers_attention(torch.nn.Module(), q, q, q, None)  # no is_causal: causal, as SDPA
        >>> torch.allclose(out, reference_attention(q, q, q, causal=True), atol=1e-5)
        True
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    unsupported = (
        (dropout and module.training) or kwargs.get("output_attentions")
        or any(kwargs.get(name) is not None for name in _UNSUPPORTED_KWARGS)
        or (attention_mask is not None and attention_mask.dim() != 4)
        or not native_attention_supports(query, key, value, attention_mask)
    )
    if unsupported:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # exactly SDPA's reading of the flags (transformers' sdpa_attention_forward)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q_length = query.shape[2]
    causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    return attention(query, key, value, attention_mask, scaling, causal), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, transformers_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # masks built as for SDPA


def use_native_attention(model: nn.Module) -> bool:
    """Run a transformers model's SDPA attention on the native kernels; False (unchanged) where not.

    Only models set to `sdpa` switch (one asked for `eager` keeps it: it may want attention
    weights); the switch is transformers' own `set_attn_implementation`, so
    `model.set_attn_implementation("sdpa")` undoes it.

    Example:
        >>> use_native_attention(torch.nn.Linear(2, 2))
        False
    """
    config = getattr(model, "config", None)
    if (not native.native_available() or not hasattr(model, "set_attn_implementation")
            or getattr(config, "_attn_implementation", None) != "sdpa"):
        return False
    _register()
    try:
        model.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError):  # this model refuses custom attention functions
        return False
    return True


__all__ = [
    "ATTENTION_NAME",
    "attention",
    "native_attention_supports",
    "reference_attention",
    "transformers_attention",
    "use_native_attention",
]
