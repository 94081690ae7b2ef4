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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq, width] -> [batch, width]: the mean over real tokens (sentence-transformers' pooling).

    Example:
        >>> mean_pool(torch.tensor([[[1.0], [3.0], [9.0]]]), torch.tensor([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)


def pooled_output(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled final hidden states over real tokens (sentence-transformers' default pooling)."""
    with torch.no_grad():
        out = _forward(model, batch)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) is not None else out[0]
    return mean_pool(hidden, batch["attention_mask"])


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of matching rows."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def fidelity(model: nn.Module, reference: nn.Module, samples: list[torch.Tensor], batch_size: int = 16, pad_id: int = 0) -> float:
    """Mean cosine of `model`'s pooled outputs to `reference`'s on the same held-out samples."""
    scores = []
    for batch in make_batches(samples, batch_size, pad_id):
        scores.append(mean_cosine(pooled_output(model, batch), pooled_output(reference, batch)) * len(batch["input_ids"]))
    return sum(scores) / len(samples)


HELDOUT_SEED = 1234  # the held-out windows `sparsepress eval` and every sweep trial score on


def heldout_samples(tokenizer: Any, text: str, samples: int = 64, seq_len: int = 128,
                    source: str = "bundled held-out text") -> list[torch.Tensor]:
    """The held-out windows quality is measured on: `samples` x `seq_len` tokens of `text`, fixed seed.

    Example:
        >>> from sparsepress.sources import bundled_text, resolve_model_path
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
        >>> [t.shape[0] for t in heldout_samples(tok, bundled_text("heldout"), 2, 16)]
        [16, 16]
    """
    from .sources import token_samples

    return token_samples(tokenizer, text, samples, seq_len, seed=HELDOUT_SEED, source=source)


def quality(model: nn.Module, reference: nn.Module, samples: list[torch.Tensor], pad_id: int = 0) -> dict[str, float]:
    """What `sparsepress eval` reports: fidelity to `reference`, and perplexities for causal LMs.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=32, vocab_size=50)).eval()
        >>> round(quality(m, m, [torch.randint(1, 50, (6,)) for _ in range(2)])["fidelity"], 4)
        1.0
    """
    result = {"fidelity": fidelity(model, reference, samples, pad_id=pad_id)}
    if is_causal_lm(model):
        result["perplexity"] = perplexity(model, samples, pad_id=pad_id)
        result["reference perplexity"] = perplexity(reference, samples, pad_id=pad_id)
    return result


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
    return interleaved_ms({"run": run}, rounds=repeats, warmup=warmup)["run"]


def latency_ms(model: nn.Module, batch: dict[str, torch.Tensor], repeats: int = 10) -> float:
    """Median forward latency of `model` on `batch`, in milliseconds."""
    return median_ms(forward_runner(model, batch), repeats=repeats)


def interleaved_ms(runs: dict[str, Callable[[], Any]], rounds: int = 10, per_round: int = 1,
                   warmup: int = 2) -> dict[str, float]:
    """Median wall time (ms) of each run, timed round-robin so machine noise hits every one alike.

    Each round runs every entry `per_round` times in turn; a slow phase of a shared machine then
    lands on all entries instead of on whichever one was being timed, and ratios stay honest.

    Example:
        >>> sorted(interleaved_ms({"a": lambda: None, "b": lambda: None}, rounds=3))
        ['a', 'b']
    """
    for run in runs.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run()
                times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


def forward_runner(model: nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """A no-argument callable running one inference-mode forward of `model` on `batch` (for timers).

    Example:
        >>> class Echo(nn.Module):
        ...     def forward(self, **batch):
        ...         return batch
        >>> forward_runner(Echo(), {"input_ids": torch.ones(1)})() is None
        True
    """
    def run() -> None:
        with torch.inference_mode():
            _forward(model, batch)

    return run


def models_ms(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], rounds: int = 10) -> dict[str, float]:
    """Median forward latency (ms) of several models on one batch, measured interleaved.

    Example:
        >>> class Echo(nn.Module):
        ...     def forward(self, **batch):
        ...         return batch
        >>> sorted(models_ms({"echo": Echo()}, {"input_ids": torch.ones(1)}, rounds=2))
        ['echo']
    """
    return interleaved_ms({name: forward_runner(model, batch) for name, model in models.items()}, rounds=rounds)


def random_batch(model: nn.Module, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Seeded random token ids (ids 1000..1999 where the vocabulary allows) and a full mask: what `bench` times.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=32, vocab_size=50))
        >>> random_batch(m, 2, 8)["input_ids"].shape
        torch.Size([2, 8])
    """
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 1000))
    gen = torch.Generator().manual_seed(0)
    low, high = (1000, 2000) if vocab > 2000 else (0, vocab)
    ids = torch.randint(low, high, (batch, seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def dynamic_int8(model: nn.Module) -> nn.Module:
    """torch's dynamic int8 quantization of every nn.Linear (fbgemm): the dense int8 baseline."""
    import copy
    import warnings

    with warnings.catch_warnings():
        # torch marks its eager int8 path deprecated; it is still what a PyTorch user has today.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties get their average rank).

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 25.0])), 6)
        1.0
    """
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double().reshape(-1)
        order = torch.argsort(x)
        rank = torch.empty_like(x)
        rank[order] = torch.arange(len(x), dtype=torch.float64)
        values, inverse = torch.unique(x, return_inverse=True)
        summed = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, rank)
        counts = torch.zeros(len(values), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rank))
        return (summed / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 0.0


def _pooled(model: nn.Module, samples: list[torch.Tensor], batch_size: int, pad_id: int) -> torch.Tensor:
    return torch.cat([pooled_output(model, batch) for batch in make_batches(samples, batch_size, pad_id)])


def similarity_spearman(
    model: nn.Module,
    reference: nn.Module,
    samples_a: list[torch.Tensor],
    samples_b: list[torch.Tensor],
    batch_size: int = 16,
    pad_id: int = 0,
) -> float:
    """Spearman correlation between `reference`'s and `model`'s cosine similarities of sample pairs.

    Pair i is (samples_a[i], samples_b[i]); each side is mean-pooled as in `fidelity`. It proxies a
    sentence-similarity benchmark (STS) against the dense model: 1.0 means the compressed model
    orders every pair's similarity exactly as the dense one does. `sentence_pairs` makes pairs.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...                          intermediate_size=32, vocab_size=50)).eval()
        >>> a = [torch.randint(1, 50, (6,)) for _ in range(5)]; b = [torch.randint(1, 50, (6,)) for _ in range(5)]
        >>> round(similarity_spearman(m, m, a, b), 6)
        1.0
    """
    if len(samples_a) != len(samples_b) or len(samples_a) < 2:
        raise ValueError(f"need two equally long lists of at least 2 samples, got {len(samples_a)} and {len(samples_b)}")
    similarities = []
    for net in (model, reference):
        a, b = _pooled(net, samples_a, batch_size, pad_id), _pooled(net, samples_b, batch_size, pad_id)
        similarities.append(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1))
    return spearman(similarities[0], similarities[1])


def sentence_pairs(tokenizer: Any, text: str, pairs: int = 128, max_len: int = 64, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Token-id pairs of sentences from `text`: half neighbours (similar), half random (dissimilar).

    Sentences are split on ' . ' (WikiText's tokenized full stop) and newlines; ones under four
    words are dropped. Encoders get their special tokens, so pairs feed `similarity_spearman` as is.

    Example:
        >>> from sparsepress.sources import bundled_text, resolve_model_path
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
        >>> a, b = sentence_pairs(tok, bundled_text("heldout"), pairs=8)
        >>> len(a), len(b)
        (8, 8)
    """
    import random
    import re

    sentences = [s.strip() + " ." for s in re.split(r" \. |\n", text) if len(s.split()) >= 4]
    if len(sentences) < 4:
        raise ValueError("text has too few sentences to make pairs")
    rng = random.Random(seed)
    chosen = []
    for index in range(pairs):
        i = rng.randrange(len(sentences) - 1)
        j = i + 1 if index % 2 == 0 else rng.randrange(len(sentences))
        chosen.append((sentences[i], sentences[j]))

    def encode(sentence: str) -> torch.Tensor:
        ids = tokenizer(sentence, truncation=True, max_length=max_len)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        if getattr(tokenizer, "cls_token_id", None) is None and bos is not None and ids[:1] != [bos]:
            ids = [bos] + ids[: max_len - 1]
        return torch.tensor(ids, dtype=torch.long)

    return [encode(a) for a, _ in chosen], [encode(b) for _, b in chosen]
