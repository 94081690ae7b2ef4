"""Calibration statistics of the structured units: what flows into each block's attention output and
FFN output projections, column by column (a column of the FFN output projection's input is one FFN
channel; `head_dim` consecutive columns of the attention output's input are one head).

One pass over the calibration batches records, per column, the squared activation norm (for the
activation-weighted score), optionally the per-sample first-order Taylor terms `sum_t g_tc a_tc`
(gradients of the model's loss: next-token cross-entropy for causal LMs, a seeded random projection
of the final hidden states otherwise), and optionally the inputs' Hessians (for the least-squares
refit of the output projections after removal).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.calibration import make_batches
    >>> from sparsepress.models.anatomy import block_anatomies
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    ...                              intermediate_size=48, vocab_size=64)).eval()
    >>> batches = make_batches([torch.randint(0, 64, (8,)) for _ in range(4)], 2, 0)
    >>> stats = collect_unit_stats(model, block_anatomies(model), batches, taylor=True)
    >>> stats[0].ffn.norm_sq.shape, stats[0].heads.taylor.shape
    (torch.Size([48]), torch.Size([4, 32]))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..evaluate import is_causal_lm
from ..models.anatomy import BlockAnatomy
from ..passes.blocks import drop_padding, forward_kwargs, real_tokens
from ..prune.stats import LayerStats


@dataclass
class ColumnStats:
    """Per-column statistics of one projection's input over the calibration tokens.

    `norm_sq`: sum over tokens of a^2 (float64 [columns]); `taylor`: one row per calibration sample
    of sum over its tokens of g * a (float64 [samples, columns]), when asked; `hessian`: the
    input's LayerStats, when asked.
    """

    norm_sq: torch.Tensor
    taylor: torch.Tensor | None = None
    hessian: LayerStats | None = None
    _taylor_rows: list[torch.Tensor] = field(default_factory=list)

    def finish(self) -> None:
        if self._taylor_rows:
            self.taylor = torch.cat(self._taylor_rows)
            self._taylor_rows.clear()


@dataclass
class BlockUnitStats:
    """The statistics of one block: its FFN channels and its attention heads."""

    ffn: ColumnStats
    heads: ColumnStats


def _loss(model: nn.Module, output: Any, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
    """The scalar whose gradient the Taylor score reads (see the module docstring)."""
    mask = batch["attention_mask"]
    if is_causal_lm(model):
        logits = output.logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
    hidden = output[0] if not hasattr(output, "last_hidden_state") else output.last_hidden_state
    projection = torch.randn(hidden.shape, generator=generator)
    return (hidden * projection * mask.unsqueeze(-1)).sum()


def collect_unit_stats(model: nn.Module, anatomies: list[BlockAnatomy], batches: list[dict[str, torch.Tensor]], *,
                       taylor: bool = False, hessians: bool = False, seed: int = 0) -> list[BlockUnitStats]:
    """Statistics of every block's FFN channels and heads over `batches` (see the module docstring)."""
    stats = [BlockUnitStats(*(ColumnStats(torch.zeros(model.get_submodule(name).in_features, dtype=torch.float64),
                                          hessian=LayerStats(model.get_submodule(name).in_features, name=name) if hessians else None)
                              for name in (a.ffn_out, a.o)))
             for a in anatomies]
    running: dict[str, Any] = {}
    leaves: list[tuple[ColumnStats, torch.Tensor]] = []

    def hook_for(column: ColumnStats) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
            x = args[0]
            flat = drop_padding(x.detach().reshape(-1, x.shape[-1]), running["tokens"]).double()
            column.norm_sq += (flat * flat).sum(dim=0)
            if column.hessian is not None:
                column.hessian.add(flat.float())
            if not taylor:
                return None
            leaf = x.detach().requires_grad_(True)
            leaves.append((column, leaf))
            return (leaf, *args[1:])
        return hook

    handles = []
    for anatomy, block_stats in zip(anatomies, stats):
        handles.append(model.get_submodule(anatomy.ffn_out).register_forward_pre_hook(hook_for(block_stats.ffn)))
        handles.append(model.get_submodule(anatomy.o).register_forward_pre_hook(hook_for(block_stats.heads)))
    generator = torch.Generator().manual_seed(seed)
    extra = forward_kwargs(model)
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)  # gradients reach the recorded activations only
        for batch in batches:
            running["tokens"] = real_tokens(batch)
            leaves.clear()
            with torch.set_grad_enabled(taylor):
                output = model(**batch, **extra)
                if taylor:
                    _loss(model, output, batch, generator).backward()
            for column, leaf in leaves:
                mask = batch["attention_mask"].unsqueeze(-1).to(torch.float64)
                terms = (leaf.grad.double() * leaf.detach().double() * mask).sum(dim=1)  # [batch, columns]
                column._taylor_rows.append(terms)
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(True)
    for block_stats in stats:
        block_stats.ffn.finish()
        block_stats.heads.finish()
    return stats
