"""The distillation batches: each step draws `batch_size` calibration samples and crops them to
`seq_len` tokens at random offsets, all from a generator seeded by (seed, step), so step k's batch is
the same in every run and in a resumed one.

Encoder samples keep their first and last token (the [CLS] / [SEP] framing) around the crop; causal
LM samples are cropped contiguously.

Example:
    >>> import torch
    >>> samples = [torch.arange(1, 21), torch.arange(30, 35)]
    >>> batch = distill_batch(samples, step=0, batch_size=2, seq_len=8, seed=0, pad_id=0, causal=False)
    >>> batch["input_ids"].shape, int(batch["input_ids"][0, 0]) in (1, 30)
    (torch.Size([2, 8]), True)
    >>> torch.equal(batch["input_ids"], distill_batch(samples, 0, 2, 8, 0, 0, False)["input_ids"])
    True
"""

from __future__ import annotations

import torch

from ..calibration import make_batches


def _crop(sample: torch.Tensor, seq_len: int, generator: torch.Generator, causal: bool) -> torch.Tensor:
    if len(sample) <= seq_len:
        return sample
    if causal:
        start = int(torch.randint(0, len(sample) - seq_len + 1, (1,), generator=generator))
        return sample[start:start + seq_len]
    body = sample[1:-1]
    start = int(torch.randint(0, len(body) - (seq_len - 2) + 1, (1,), generator=generator))
    return torch.cat([sample[:1], body[start:start + seq_len - 2], sample[-1:]])


def distill_batch(samples: list[torch.Tensor], step: int, batch_size: int, seq_len: int, seed: int, pad_id: int,
                  causal: bool) -> dict[str, torch.Tensor]:
    """The padded batch of distillation step `step` (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    chosen = torch.randint(0, len(samples), (batch_size,), generator=generator).tolist()
    return make_batches([_crop(samples[i], seq_len, generator, causal) for i in chosen], batch_size, pad_id)[0]
