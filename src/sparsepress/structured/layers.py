"""Which whole blocks to remove: by block influence (how little a block changes its input on
calibration data: 1 - cosine of its input and output hidden states per real token, ShortGPT's BI),
or by measured loss (the output's deviation from the full model's with the block skipped, blocks
removed greedily one at a time: 1 - cosine of the mean-pooled output for encoders, the next-token
distribution's KL divergence for causal LMs).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.calibration import make_batches
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=64)).eval()
    >>> batches = make_batches([torch.randint(0, 64, (8,)) for _ in range(2)], 2, 0)
    >>> block_influence(model, batches).shape
    torch.Size([3])
    >>> len(kept_blocks(model, batches, 1, "loss"))
    2
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..evaluate import is_causal_lm, mean_pool
from ..models.layout import find_layout
from ..passes.blocks import forward_kwargs, hidden_of


def _block_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def block_influence(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean over real calibration tokens of 1 - cos(block input, block output), per block."""
    blocks = [b for _, b in find_layout(model).blocks]
    totals = torch.zeros(len(blocks), dtype=torch.float64)
    count = [0]
    running: dict[str, torch.Tensor] = {}

    def hook_for(index: int) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            x, y = _block_input(args, kwargs), hidden_of(output)
            cos = nn.functional.cosine_similarity(x.double(), y.double(), dim=-1)
            totals[index] += float((1 - cos)[running["mask"]].sum())
        return hook

    handles = [b.register_forward_hook(hook_for(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for batch in batches:
                running["mask"] = batch["attention_mask"].bool()
                count[0] += int(running["mask"].sum())
                model(**batch, **forward_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return totals / max(count[0], 1)


@contextmanager
def skipping(blocks: list[nn.Module]) -> Iterator[None]:
    """While inside, each of `blocks` passes its input hidden states through unchanged."""
    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = _block_input(args, kwargs)
        if isinstance(output, torch.Tensor):
            return x
        return (x, *output[1:])

    handles = [b.register_forward_hook(hook, with_kwargs=True) for b in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch, **forward_kwargs(model))
    if is_causal_lm(model):
        return out.logits.float().log_softmax(dim=-1)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return mean_pool(hidden, batch["attention_mask"])


def _deviation(causal: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]:
    def kl(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
        per_token = (reference.exp() * (reference - other)).sum(dim=-1)
        return float(per_token[mask.bool()].sum())

    def cosine(reference: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> float:
        return float((1 - nn.functional.cosine_similarity(reference.double(), other.double(), dim=-1)).sum())

    return kl if causal else cosine


def kept_blocks(model: nn.Module, batches: list[dict[str, torch.Tensor]], remove: int, score: str) -> list[int]:
    """Indices of the blocks to keep after removing `remove` of them by `score` (influence | loss)."""
    n = len(find_layout(model).blocks)
    if remove <= 0:
        return list(range(n))
    if score == "influence":
        influence = block_influence(model, batches)
        drop = sorted(range(n), key=lambda i: (float(influence[i]), i))[:remove]
        return [i for i in range(n) if i not in drop]
    if score != "loss":
        raise ValueError(f"layer score {score!r}: influence | loss")
    blocks = [b for _, b in find_layout(model).blocks]
    deviation = _deviation(is_causal_lm(model))
    with torch.no_grad():
        references = [_outputs(model, batch) for batch in batches]
        removed: list[int] = []
        for _ in range(remove):
            losses = {}
            for candidate in (i for i in range(n) if i not in removed):
                with skipping([blocks[i] for i in (*removed, candidate)]):
                    losses[candidate] = sum(deviation(ref, _outputs(model, batch), batch["attention_mask"])
                                            for ref, batch in zip(references, batches))
            removed.append(min(losses, key=lambda i: (losses[i], i)))
    return [i for i in range(n) if i not in removed]
