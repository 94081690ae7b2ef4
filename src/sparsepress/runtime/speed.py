"""Generation speed side by side: prefill and greedy-decode tokens per second of causal LMs.

A model with a native decoder plan (`NativeDecoder`) is timed on its native loop; any other (torch
fp32, torch dynamic int8) on transformers' `generate()` with its cache: prefill is one forward over
the prompt, decode is the time of `max_new_tokens` steps less that of one. Rounds alternate between
the models so a slow phase of a shared machine hits all alike; medians are reported.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> tiny = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...                                     num_attention_heads=2, vocab_size=32)).eval()
    >>> rows = generation_rates({"tiny": tiny}, prompt=4, new_tokens=3, rounds=1)
    >>> [name for name, _, _ in rows], all(p > 0 and d > 0 for _, p, d in rows)
    (['tiny'], True)
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError
from .decode import NativeDecoder


def _native_timer(decoder: NativeDecoder, ids: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float]]:
    def run() -> tuple[float, float]:
        with torch.inference_mode():
            decoder.generate(ids, new_tokens)
        timing = decoder.timing
        return timing.prefill_s, timing.decode_s / max(1, timing.new_tokens - 1)

    return run


def _generate_timer(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float]]:
    def generate(count: int) -> float:
        start = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, min_new_tokens=count,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    def run() -> tuple[float, float]:
        with torch.inference_mode():
            start = time.perf_counter()
            model(input_ids=ids, use_cache=True)
            prefill = time.perf_counter() - start
            one, many = generate(1), generate(new_tokens)
        return prefill, max(many - one, 1e-9) / (new_tokens - 1)

    return run


def _timer(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> Callable[[], tuple[float, float]]:
    try:
        return _native_timer(NativeDecoder(model), ids, new_tokens)
    except InputError:
        return _generate_timer(model, ids, new_tokens)


def generation_rates(models: dict[str, nn.Module], prompt: int = 32, new_tokens: int = 32, rounds: int = 3,
                     batch: int = 1, vocab: int | None = None) -> list[tuple[str, float, float]]:
    """(name, prefill tokens/s, decode tokens/s) of each model on one random prompt of `prompt` tokens.

    See the module docstring for how each model is timed.
    """
    if new_tokens < 2:
        raise InputError("new_tokens", "decode speed needs at least 2 new tokens")
    first = next(iter(models.values()))
    vocab = vocab or int(first.config.vocab_size)
    ids = torch.randint(0, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))
    timers = {name: _timer(model, ids, new_tokens) for name, model in models.items()}
    for run in timers.values():  # warm-up: lazily built panels, caches, allocator
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
    for _ in range(rounds):
        for name, run in timers.items():
            samples[name].append(run())
    rows = []
    for name, values in samples.items():
        prefill = statistics.median(v[0] for v in values)
        step = statistics.median(v[1] for v in values)
        rows.append((name, batch * prompt / prefill, batch / step))
    return rows


__all__ = ["generation_rates"]
