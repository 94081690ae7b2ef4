"""The config of a structurally pruned model, and the per-block shapes a config cannot express.

`rewrite_config_` writes the new shapes into `model.config` (`num_hidden_layers`, per-layer lists such
as `layer_types`, the FFN width key, `num_attention_heads`, `num_key_value_heads`, `head_dim`) when
every block has the same shape and the model class, built from that config alone, has exactly these
shapes (checked on the meta device). Otherwise the keys it cannot express keep their old values and the
record says `plain_config: false` with the reason: the folder then needs sparsepress (`sp.load` builds
the model from the config and `apply_block_shapes_` resizes each block from the record), and
`sparsepress export --to hf` refuses it.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaModel
    >>> from sparsepress.models.anatomy import block_anatomies
    >>> from sparsepress.structured.units import channel_units
    >>> from sparsepress.structured.surgery import remove_units_
    >>> model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    >>> a = block_anatomies(model)[0]
    >>> after = remove_units_(model, a, channel_units(a), keep=list(range(24)))
    >>> rewrite_config_(model, [after], [0])
    (True, None)
    >>> model.config.intermediate_size
    24
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from ..models.anatomy import (
    FFN_WIDTH_ATTRS,
    FFN_WIDTH_KEYS,
    HEAD_COUNT_ATTRS,
    HEADS_WIDTH_ATTRS,
    KV_COUNT_ATTRS,
    BlockAnatomy,
    config_dims,
)
from ..models import replace_module
from .surgery import _update_attrs_

# Config lists with one entry per block (sliced to the kept blocks when blocks are removed).
PER_LAYER_KEYS = ("layer_types", "no_rope_layers")


def ffn_key(config: Any) -> str | None:
    """The config key holding the FFN width (the first of FFN_WIDTH_KEYS the config has).

    Example:
        >>> from transformers import GPT2Config
        >>> ffn_key(GPT2Config())
        'n_inner'
    """
    present = config.to_dict()
    return next((key for key in FFN_WIDTH_KEYS if key in present), None)


def expected_shapes(anatomy: BlockAnatomy, hidden: int) -> dict[str, tuple[int, int]]:
    """[out, in] of every Linear the anatomy names.

    Example:
        >>> a = BlockAnatomy(0, "b", None, (), "b.qkv", "b.o", ("b.up",), "b.down", "b", "b", 2, 2, 4, 8)
        >>> expected_shapes(a, 8)["b.qkv"]
        (24, 8)
    """
    hd = anatomy.head_dim
    q, kv = anatomy.heads * hd, anatomy.kv_heads * hd
    shapes = {anatomy.o: (hidden, q), anatomy.ffn_out: (hidden, anatomy.ffn_width)}
    shapes.update({name: (anatomy.ffn_width, hidden) for name in anatomy.ffn_in})
    if anatomy.fused is not None:
        shapes[anatomy.fused] = (q + 2 * kv, hidden)
    else:
        shapes[anatomy.q] = (q, hidden)  # type: ignore[index]
        shapes.update({name: (kv, hidden) for name in anatomy.kv})
    return shapes


def _mismatch(model: nn.Module, config: Any, anatomies: list[BlockAnatomy], roles: str) -> str | None:
    """Why `type(model)(config)` would not have these blocks' `roles` ("ffn" or "attention") shapes
    (None when it would)."""
    try:
        with torch.device("meta"):
            skeleton = type(model)(config)
    except Exception as exc:  # a config the class refuses (e.g. heads not dividing the hidden size)
        return f"{type(model).__name__} cannot be built from it ({exc})"
    hidden = int(config.hidden_size)
    for anatomy in anatomies:
        ffn_names = {*anatomy.ffn_in, anatomy.ffn_out}
        for name, shape in expected_shapes(anatomy, hidden).items():
            if (name in ffn_names) != (roles == "ffn"):
                continue
            try:
                built = skeleton.get_submodule(name)
            except AttributeError:
                return f"it has no module {name}"
            got = tuple(built.weight.shape)
            if type(built).__name__ == "Conv1D":  # GPT-2 keeps [in, out]; sparsepress runs it as a Linear
                got = got[::-1]
            if got != shape:
                return f"it builds {name} as {list(got)}, the pruned block has {list(shape)}"
    return None


def _set_or_revert(config: Any, values: dict[str, Any], check: Any) -> str | None:
    """Set `values` on the config; if `check()` then reports a mismatch, put the old values back."""
    before = {attr: (hasattr(config, attr), getattr(config, attr, None)) for attr in values}
    for attr, value in values.items():
        setattr(config, attr, value)
    reason = check()
    if reason is not None:
        for attr, (had, old) in before.items():
            if had:
                setattr(config, attr, old)
            elif attr in config.__dict__:
                delattr(config, attr)
    return reason


def rewrite_config_(model: nn.Module, anatomies: list[BlockAnatomy], source_index: list[int]) -> tuple[bool, str | None]:
    """Write the blocks' new shapes into `model.config` (see the module docstring).

    `source_index[i]`: which original block the i-th kept block was. Returns (plain, reason): whether the
    config alone now builds these shapes, and if not, why.
    """
    config = model.config
    original = copy.deepcopy(config)
    old_layers = int(config.num_hidden_layers)
    config.num_hidden_layers = len(anatomies)
    for key in PER_LAYER_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, list) and len(value) == old_layers:
            setattr(config, key, [value[i] for i in source_index])
    reasons = []
    widths = {a.ffn_width for a in anatomies}
    key = ffn_key(config)
    if len(widths) == 1 and _mismatch(model, config, anatomies, "ffn") is None:
        pass  # the config already builds these widths (nothing was removed)
    elif len(widths) > 1:
        reasons.append(f"per-block FFN widths differ ({sorted(widths)})")
    elif key is None:
        reasons.append(f"{type(config).__name__} has no FFN width key")
    else:
        why = _set_or_revert(config, {key: widths.pop()},
                             lambda: _mismatch(model, config, anatomies, "ffn"))
        if why is not None:
            reasons.append(f"FFN width: {why}")
    head_shapes = {(a.heads, a.kv_heads, a.head_dim) for a in anatomies}
    if head_shapes != {config_dims(original)[1:]}:
        if len(head_shapes) > 1:
            reasons.append(f"per-block head counts differ ({sorted(h[:2] for h in head_shapes)})")
        else:
            heads, kv_heads, head_dim = head_shapes.pop()
            values: dict[str, Any] = {"num_attention_heads": heads, "head_dim": head_dim}
            if "num_key_value_heads" in config.to_dict():
                values["num_key_value_heads"] = kv_heads
            why = _set_or_revert(config, values, lambda: _mismatch(model, config, anatomies, "attention"))
            if why is not None:
                reasons.append(f"{heads} heads of {head_dim}: {type(config).__name__}: {why}")
    return (not reasons), ("; ".join(reasons) or None)


def apply_block_shapes_(model: nn.Module, blocks: list[dict[str, Any]]) -> None:
    """Resize each recorded block of a model just built from its config to the record's shapes: every
    Linear of the wrong shape becomes an (uninitialised) Linear of the recorded one, and the attention
    and FFN count attributes follow. A block already of those shapes is left as it is.

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> from sparsepress.models.anatomy import block_anatomies
        >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        ...                              intermediate_size=48, vocab_size=64))
        >>> a = block_anatomies(model)[0].to_json()
        >>> apply_block_shapes_(model, [{**a, "heads": 2, "kv_heads": 2}])
        >>> tuple(model.encoder.layer[0].attention.self.query.weight.shape)
        (16, 32)
    """
    config = model.config
    hidden, heads, kv_heads, head_dim = config_dims(config)
    for body in blocks:
        anatomy = BlockAnatomy.from_json({k: v for k, v in body.items() if k in BlockAnatomy.__dataclass_fields__})
        built_width = model.get_submodule(anatomy.ffn_in[0]).weight.shape[0]
        for name, (rows, cols) in expected_shapes(anatomy, hidden).items():
            layer = model.get_submodule(name)
            if tuple(layer.weight.shape) == (rows, cols):
                continue
            device = layer.weight.device
            replace_module(model, name, nn.Linear(cols, rows, bias=layer.bias is not None, device=device))
        _update_attrs_(model.get_submodule(anatomy.ffn), {FFN_WIDTH_ATTRS: (built_width, anatomy.ffn_width)})
        _update_attrs_(model.get_submodule(anatomy.attention), {
            HEADS_WIDTH_ATTRS: (heads * head_dim, anatomy.heads * anatomy.head_dim),
            HEAD_COUNT_ATTRS: (heads, anatomy.heads),
            KV_COUNT_ATTRS: (kv_heads, anatomy.kv_heads),
        })
