"""Shape surgery: remove units (FFN channels, head groups) from a block, or whole blocks from a model.

Linear layers are replaced by smaller ones holding the kept rows / columns; the attention and FFN
modules' count attributes (`models.anatomy` tables) follow, so the model runs as a smaller model of
the same class. Removing nothing rebuilds the same layers (an identity).

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaModel
    >>> from sparsepress.models.anatomy import block_anatomies
    >>> from sparsepress.structured.units import head_units
    >>> model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    >>> anatomy = block_anatomies(model)[0]
    >>> after = remove_units_(model, anatomy, head_units(anatomy), keep=[1])
    >>> after.heads, after.kv_heads, tuple(model.layers[0].self_attn.q_proj.weight.shape)
    (2, 1, (16, 32))
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models import replace_module
from ..models.anatomy import FFN_WIDTH_ATTRS, HEAD_COUNT_ATTRS, HEADS_WIDTH_ATTRS, KV_COUNT_ATTRS, BlockAnatomy
from ..models.layout import find_layout
from ..prune.refit import damp_
from ..prune.stats import LayerStats
from .units import Units


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None, columns: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with the kept `rows` (outputs) and `columns` (inputs) of `linear`, or the given
    `weight` / `bias` in their place.

    Example:
        >>> sliced_linear(nn.Linear(4, 3), rows=torch.tensor([0, 2])).weight.shape
        torch.Size([2, 4])
    """
    w = linear.weight.detach()
    w = w if rows is None else w[rows]
    w = w if columns is None else w[:, columns]
    w = w if weight is None else weight
    b = linear.bias.detach() if linear.bias is not None else None
    if b is not None and rows is not None:
        b = b[rows]
    if bias is not None:
        b = bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def refit_consumer(weight: torch.Tensor, bias: torch.Tensor | None, stats: LayerStats, keep: torch.Tensor,
                   dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights (and bias shift) on the kept input columns that best reproduce the full
    layer's outputs on the calibration inputs: the removed columns' contribution is absorbed by the
    kept ones (their correlation) and, with a bias, by its mean.

    Example:
        >>> s = LayerStats(2); s.add(torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.1]]))
        >>> w, b = refit_consumer(torch.tensor([[1.0, 1.0]]), None, s, torch.tensor([0]), dampening=0.0)
        >>> round(float(w[0, 0]), 2)
        2.02
    """
    gram = stats.xtx
    n = max(stats.n_tokens, 1)
    w = weight.detach().double()
    kept = gram[keep][:, keep].clone()
    damp_(kept, dampening)
    rhs = w @ gram[:, keep]  # [out, kept]
    if bias is None:
        solved = torch.linalg.solve(kept, rhs.T).T
        return solved.to(weight.dtype), None
    total = stats._sum  # noqa: SLF001 - the mean input lets the bias absorb the removed columns' mean
    k = len(keep)
    system = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = kept
    system[:k, k] = system[k, :k] = total[keep]
    system[k, k] = n
    rhs = torch.cat([rhs, (w @ total).unsqueeze(1)], dim=1)
    solved = torch.linalg.solve(system, rhs.T).T
    return solved[:, :k].to(weight.dtype), (bias.detach().double() + solved[:, k]).to(bias.dtype)


def _update_attrs_(module: nn.Module, changes: dict[tuple[str, ...], tuple[int, int]]) -> None:
    """Set each listed int attribute that holds its old value to the new one, in `module` and below
    (Linear layers excluded)."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            continue
        for names, (old, new) in changes.items():
            for attr in names:
                value = sub.__dict__.get(attr)
                if isinstance(value, int) and not isinstance(value, bool) and value == old:
                    setattr(sub, attr, new)


def remove_units_(model: nn.Module, anatomy: BlockAnatomy, units: Units, keep: list[int],
                  refit: LayerStats | None = None, dampening: float = 0.01) -> BlockAnatomy:
    """Keep only units `keep` of one block (see the module example); returns the block's new anatomy.

    `refit`: the consumer's input statistics; its kept weights are then refitted by least squares
    (`refit_consumer`) instead of merely sliced.
    """
    keep = sorted(keep)
    if not keep:
        raise ValueError(f"{anatomy.block}: a block must keep at least one {units.pattern} unit")
    for name in units.rows:
        replace_module(model, name, sliced_linear(model.get_submodule(name), rows=units.kept_rows(name, keep)))
    consumer = model.get_submodule(units.consumer)
    columns = units.kept_columns(keep)
    if refit is not None:
        weight, bias = refit_consumer(consumer.weight, consumer.bias, refit, columns, dampening)
        replace_module(model, units.consumer, sliced_linear(consumer, weight=weight, bias=bias))
    else:
        replace_module(model, units.consumer, sliced_linear(consumer, columns=columns))
    if units.pattern == "channel":
        width = anatomy.ffn_width * len(keep) // units.count
        _update_attrs_(model.get_submodule(anatomy.ffn), {FFN_WIDTH_ATTRS: (anatomy.ffn_width, width)})
        return dataclasses.replace(anatomy, ffn_width=width)
    heads, kv_heads = anatomy.group_size * len(keep), len(keep)
    hd = anatomy.head_dim
    # Widths first: a heads count could equal an old width only in degenerate shapes, never the reverse.
    _update_attrs_(model.get_submodule(anatomy.attention), {
        HEADS_WIDTH_ATTRS: (anatomy.heads * hd, heads * hd),
        HEAD_COUNT_ATTRS: (anatomy.heads, heads),
        KV_COUNT_ATTRS: (anatomy.kv_heads, kv_heads),
    })
    return dataclasses.replace(anatomy, heads=heads, kv_heads=kv_heads)


def block_container(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the model's blocks, and its qualified name.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> block_container(BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        ...                                      intermediate_size=64)))[0]
        'encoder.layer'
    """
    blocks = find_layout(model).blocks
    parent = blocks[0][0].rpartition(".")[0] if blocks and blocks[0][0] else ""
    container = model.get_submodule(parent) if parent else None
    if not isinstance(container, nn.ModuleList):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UnsupportedModelError(str(kind), "block removal", "the blocks are not one ModuleList")
    return parent, container


def remove_blocks_(model: nn.Module, keep: list[int]) -> None:
    """Keep only the blocks `keep` (in order); each kept block's `layer_idx` attributes are renumbered
    (the KV cache and per-layer attention types index by them).

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64))
        >>> remove_blocks_(m, [0, 2]); len(m.encoder.layer)
        2
    """
    name, container = block_container(model)
    kept = [container[i] for i in sorted(keep)]
    for position, block in enumerate(kept):
        for sub in block.modules():
            if isinstance(sub.__dict__.get("layer_idx"), int):
                sub.layer_idx = position
    replace_module(model, name, nn.ModuleList(kept))
