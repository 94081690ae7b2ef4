"""Greedy decoding with every step native: embedding lookup, the blocks with a KV cache, final norm, LM
head and argmax in one call per token (`_native.CausalLM.step`).

transformers' `generate()` keeps working on the same model (through its modules and HF's cache); this
is the faster path for greedy decoding. The embedding table may be float32 or int8 / int4
(`QuantizedEmbedding`); the LM head a packed layer (int8, dense or sparse) or a float32 Linear (run
from its own storage by the float kernel). Activation sparsity and nested elastic levels apply in every
step at the levels set when `generate` starts (`sp.set_activation_sparsity`, `sp.set_sparsity`). MoE decoders decode the same way (their MoE
blocks are blocks of the Stack, `moe_plan`), with the adaptive routing (`sp.set_routing`) set when
`generate` starts; the experts' counts reach each layer's `RoutedExperts.counts` when it returns.

Example:
    >>> import torch, sparsepress as sp
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    ...                      num_key_value_heads=2, vocab_size=64)
    >>> torch.manual_seed(0); model = LlamaForCausalLM(config).eval()
    <torch._C.Generator object at ...>
    >>> model = sp.compress(model, {"stages": [{"quantize": {"method": "rtn"}}]}, calibration=[torch.arange(8)])
    >>> out = generate(model, torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    >>> out.shape
    torch.Size([1, 7])
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import native
from ..errors import InputError
from ..nn import QuantizedEmbedding
from .plan import StackPlan, _projection, float_projection
from .switch import disable_native_blocks, native_blocks_of, native_blocks_reason, use_native_blocks

# Rotary variants whose tables depend on the position only (dynamic / longrope rescale with the length).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


@dataclass
class DecodeTiming:
    """Wall times of the last `generate`: the prompt (prefill) and the tokens after it."""

    prompt_tokens: int = 0
    prefill_s: float = 0.0
    new_tokens: int = 0
    decode_s: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the steps after the first new token (which the prefill produces)."""
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 and self.new_tokens > 1 else 0.0


def _embedding(embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    if isinstance(embed, QuantizedEmbedding):
        return embed.codes, embed.scales, embed.bits
    if type(embed) is nn.Embedding and embed.max_norm is None and embed.weight.dtype == torch.float32:
        return embed.weight.detach().contiguous(), None, 32
    raise InputError(type(embed).__name__, "the native decoder reads nn.Embedding (float32) or QuantizedEmbedding tables")


class NativeDecoder:
    """Greedy decoding of a causal LM whose blocks run natively (see the module docstring).

    Raises InputError when the model cannot decode natively (no native block plan, an unsupported
    embedding, head or rotary variant).
    """

    def __init__(self, model: nn.Module):
        lib = native.module()
        forward = native_blocks_of(model)
        if forward is None and use_native_blocks(model):
            forward = native_blocks_of(model)
        if lib is None or forward is None or not forward.plan.roles.pre_norm:
            why = native_blocks_reason(model)
            raise InputError(type(model).__name__, "no native decoder plan (a supported causal LM with packed block layers)"
                             + (f": {why}" if why else ""))
        plan: StackPlan = forward.plan
        rope_type = getattr(plan.rotary, "rope_type", "default")
        if plan.rotary is None or rope_type not in STATIC_ROPE:
            raise InputError(type(model).__name__, f"rotary embedding {rope_type!r} is not supported natively")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise InputError(type(model).__name__, "no output head (get_output_embeddings)")
        self.model, self.plan, self.lib, self.forward = model, plan, lib, forward
        self.table, self.scales, self.bits = _embedding(plan.entry.embed_tokens)
        if isinstance(head, nn.Linear):
            if head.weight.dtype != torch.float32 or not head.weight.is_contiguous():
                raise InputError("lm_head", "a float32 contiguous weight is needed")
            self.head, self._keep = float_projection(lib, head.weight, head.bias)
        else:
            self.head, self._keep = _projection(lib, head, "lm_head", forward.plan.guard), ()
        self.timing = DecodeTiming()

    def _rotary(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(1, 1, self.plan.hidden)
        with torch.inference_mode():
            cos, sin = self.plan.rotary(x, position_ids=torch.arange(positions).unsqueeze(0))
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def _session(self, batch: int, capacity: int, pads: list[int]) -> tuple[Any, Any]:
        cos, sin = self._rotary(capacity)
        lm = self.lib.CausalLM(self.plan.stack, self.table, self.scales, self.bits, self.head, cos, sin)
        cache = self.lib.KVCache(self.plan.stack, batch, capacity)
        for row, count in enumerate(pads):
            cache.set_padding(row, count)
        return lm, (cache, cos, sin)

    def scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [batch, vocab] of each row's last token after running `input_ids` from scratch.

        Example:
            >>> # see the module docstring for a model; scores(ids).shape == (batch, vocab)
        """
        ids = _ids(input_ids)
        lm, (cache, *_) = self._session(ids.shape[0], ids.shape[1], [0] * ids.shape[0])
        logits = torch.empty(ids.shape[0], lm.vocab)
        lm.step(ids, cache, torch.empty(ids.shape[0], dtype=torch.int64), logits, torch.get_num_threads(),
                self.plan.guard.thresholds(), self.plan.guard.level(), self._top_p())
        self._flush()
        return logits

    def _top_p(self) -> torch.Tensor | None:
        return self.plan.moe.top_p() if self.plan.moe is not None else None

    def _flush(self) -> None:
        if self.plan.moe is not None:
            self.plan.moe.flush()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 on_token: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
        """Prompt ids [batch, prompt] (left-padded where `attention_mask` has zeros) followed by up to
        `max_new_tokens` greedy tokens per row; rows that produced `eos_token_id` continue with
        `pad_token_id` (default: eos) until every row has. `on_token(ids [batch])` sees each step."""
        ids = _ids(input_ids)
        batch, prompt = ids.shape
        if max_new_tokens < 1:
            return ids.clone()
        pads = _left_pads(attention_mask, ids.shape)
        lm, keep = self._session(batch, prompt + max_new_tokens, pads)
        cache = keep[0]
        threads = torch.get_num_threads()
        # one activation level, one elastic level (`sp.set_sparsity`) and one routing setting for the generation
        thresholds, level = self.plan.guard.thresholds(), self.plan.guard.level()
        top_p = self._top_p()
        nxt = torch.empty(batch, dtype=torch.int64)
        pieces = [ids]
        finished = torch.zeros(batch, dtype=torch.bool)
        filler = eos_token_id if pad_token_id is None else pad_token_id
        start = time.perf_counter()
        lm.step(ids, cache, nxt, None, threads, thresholds, level, top_p)
        self.timing = DecodeTiming(prompt_tokens=batch * prompt, prefill_s=time.perf_counter() - start)
        start = time.perf_counter()
        for produced in range(1, max_new_tokens + 1):
            token = nxt.clone()
            if eos_token_id is not None:
                token[finished] = filler
                finished |= token == eos_token_id
            pieces.append(token.unsqueeze(1))
            if on_token is not None:
                on_token(token)
            if produced == max_new_tokens or bool(finished.all()):
                break
            lm.step(token.unsqueeze(1), cache, nxt, None, threads, thresholds, level, top_p)
        self.timing.new_tokens = len(pieces) - 1
        self.timing.decode_s = time.perf_counter() - start
        self._flush()
        return torch.cat(pieces, dim=1)


def _ids(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError("input_ids", f"expected [batch, tokens] with at least one token, got {tuple(input_ids.shape)}")
    return input_ids.to(torch.int64).contiguous()


def _left_pads(mask: torch.Tensor | None, shape: torch.Size) -> list[int]:
    """Left padding per row from an attention mask (zeros first, then ones); InputError otherwise."""
    if mask is None:
        return [0] * shape[0]
    if tuple(mask.shape) != tuple(shape):
        raise InputError("attention_mask", f"shape {tuple(mask.shape)} does not match input_ids {tuple(shape)}")
    keep = mask.to(torch.bool)
    pads = (~keep).sum(dim=1)
    expected = torch.arange(shape[1]).unsqueeze(0) >= pads.unsqueeze(1)
    if not bool((expected == keep).all()) or bool((pads == shape[1]).any()):
        raise InputError("attention_mask", "the native decoder takes left padding only (and a token in every row)")
    return [int(p) for p in pads]


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32, **kwargs: Any) -> torch.Tensor:
    """Greedy decoding with every step native; `kwargs` as `NativeDecoder.generate`. The decoder is
    built on first use and kept with the model's native forward (a model changed since gets a new plan).

    See the module docstring for an example.
    """
    forward = native_blocks_of(model)
    if forward is not None and not forward.plan.guard.current():
        disable_native_blocks(model)
        forward = None
    decoder = getattr(forward, "decoder", None)
    if not isinstance(decoder, NativeDecoder):
        decoder = NativeDecoder(model)
        decoder.forward.decoder = decoder
    with torch.inference_mode():
        return decoder.generate(input_ids, max_new_tokens, **kwargs)


__all__ = ["STATIC_ROPE", "DecodeTiming", "NativeDecoder", "generate"]
