"""Tiny random models and token ids shared by the fast tests (seeded, so every test sees the same).

Example:
    >>> len(token_ids(2, length=5)), token_ids(1, length=5)[0].shape
    (2, torch.Size([5]))
"""

from __future__ import annotations

import torch


def tiny_bert(vocab: int = 100):
    """A 2-block BERT (hidden 32) with seeded random weights, in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64)).eval()


def token_ids(n: int = 4, length: int = 12, vocab: int = 100) -> list[torch.Tensor]:
    """`n` seeded random token-id samples of `length` tokens."""
    return [torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(i)) for i in range(n)]
