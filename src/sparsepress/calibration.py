"""Calibration batches: token windows or user texts/ids, padded and batched for the model.

Example:
    >>> import torch
    >>> batches = make_batches([torch.tensor([1, 2, 3]), torch.tensor([4, 5])], batch_size=8, pad_id=0)
    >>> batches[0]["input_ids"].tolist(), batches[0]["attention_mask"].tolist()
    ([[1, 2, 3], [4, 5, 0]], [[1, 1, 1], [1, 1, 0]])
"""

from __future__ import annotations

from typing import Sequence

import torch

from .errors import InputError
from .sources import calibration_samples, read_text


def to_token_ids(
    calibration: Sequence[str] | Sequence[torch.Tensor] | None,
    tokenizer,
    samples: int,
    seq_len: int,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Token-id samples from a list of strings, a list of id tensors, or (None) the bundled text.

    From the bundled text: `samples` windows of `seq_len` tokens and up to 2 x `samples` sentences
    (`sources.calibration_samples`); from a list: its first `samples` items.
    """
    if calibration is None:
        if tokenizer is None:
            raise InputError("<calibration>", "no calibration data and no tokenizer to make it from the bundled text")
        return calibration_samples(tokenizer, read_text(None), samples, seq_len, seed, source="bundled calibration text")
    items = list(calibration)
    if not items:
        raise InputError("<calibration>", "calibration data is empty")
    if all(isinstance(item, str) for item in items):
        if tokenizer is None:
            raise InputError("<calibration>", "text calibration needs a tokenizer")
        encoded = [tokenizer(t, truncation=True, max_length=seq_len)["input_ids"] for t in items[:samples]]
        return [torch.tensor(ids, dtype=torch.long) for ids in encoded if ids]
    if all(isinstance(item, torch.Tensor) for item in items):
        return [item.reshape(-1).long()[:seq_len] for item in items[:samples]]
    raise InputError("<calibration>", "calibration must be a list of strings or a list of token-id tensors")


def make_batches(samples: list[torch.Tensor], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Batches of `input_ids` and `attention_mask`, right-padded with `pad_id`."""
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sample in enumerate(chunk):
            ids[row, : len(sample)] = sample
            mask[row, : len(sample)] = 1
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches
