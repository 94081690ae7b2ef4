"""Quality and speed measurements: fidelity to a reference, perplexity, latency side by side.

Example:
    >>> import torch
    >>> a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> round(mean_cosine(a, a), 6)
    1.0
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import nn

from .calibration import make_batches


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` predicts next tokens (has an LM head producing logits over the vocabulary).

    Example:
        >>> is_causal_lm(torch.nn.Linear(2, 2))
        False
    """
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    kwargs = {"use_cache": False} if is_causal_lm(model) else {}
    return model(**batch, output_hidden_states=is_causal_lm(model), **kwargs)


def pooled_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled final hidden states over real tokens (sentence-transformers' default pooling)."""
    with torch.no_grad():
        out = _forward(model, batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out[0]
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def fidelity(model: nn.Module, reference: nn.Module, samples: list[torch.Tensor], batch_size: int = 16, pad_id: int = 0) -> float:
    """Mean cosine of `model`'s pooled outputs to `reference`'s on the same held-out samples."""
    scores = []
    for batch in make_batches(samples, batch_size, pad_id):
        scores.append(mean_cosine(pooled_output(model, batch), pooled_output(reference, batch)) * len(batch["input_ids"]))
    return sum(scores) / len(samples)


def perplexity(model: nn.Module, samples: list[torch.Tensor], batch_size: int = 8, pad_id: int = 0) -> float:
    """exp(mean next-token negative log-likelihood) of a causal LM on `samples`."""
    total, count = 0.0, 0
    for batch in make_batches(samples, batch_size, pad_id):
        with torch.no_grad():
            logits = _forward(model, batch).logits.float()
        targets = batch["input_ids"][:, 1:]
        valid = batch["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return float(torch.exp(torch.tensor(total / max(count, 1))))


def median_ms(run: Callable[[], Any], repeats: int = 10, warmup: int = 3) -> float:
    """Median wall time of `run()` in milliseconds after `warmup` untimed calls.

    Example:
        >>> median_ms(lambda: None, repeats=3, warmup=1) >= 0
        True
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median forward latency of `model` on `batch`, in milliseconds."""
    def run() -> None:
        with torch.inference_mode():
            _forward(model, batch)

    return median_ms(run, repeats=repeats)


def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantization of every nn.Linear (fbgemm): the dense int8 baseline."""
    import copy

    from torch.ao.quantization import quantize_dynamic

    return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
