"""What structured surgery must know of each transformer block: which Linear layers are the attention's
query / key / value projections (separate or fused) and its output projection, which are the FFN's
input (up, gate) and output (down) projections, and the head counts and head size.

The roles come from the config's dimensions and one traced forward of a few dummy tokens (which
Linear layers share one input tensor, the order they run in), never from module names, so every
family whose blocks are attention-then-FFN is read the same way. The families whose attention code
has been checked against head removal (it reads head counts from the module attributes updated here,
or derives them from tensor shapes) are listed in `STRUCTURED_FAMILIES`; others are refused.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaModel
    >>> model = LlamaModel(LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
    ...                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    >>> block = block_anatomies(model)[0]
    >>> block.q, block.kv, block.ffn_in, block.ffn_out
    ('layers.0.self_attn.q_proj', ('layers.0.self_attn.k_proj', 'layers.0.self_attn.v_proj'), ('layers.0.mlp.gate_proj', 'layers.0.mlp.up_proj'), 'layers.0.mlp.down_proj')
    >>> block.heads, block.kv_heads, block.head_dim, block.ffn_width
    (4, 2, 8, 48)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from .layout import find_layout

# The families whose blocks structured surgery is tested on (tests/test_structured.py), by model_type.
STRUCTURED_FAMILIES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "llama", "mistral", "qwen2", "qwen3",
                       "gpt2", "opt")
# Config keys holding the FFN width, by family convention (the first the config has is rewritten).
FFN_WIDTH_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "hidden_dim")
# Attributes of attention modules that hold the head counts or the heads' total width; those present
# with the old value are updated when heads are removed (OPT's view, GPT-2's split read them).
HEAD_COUNT_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
KV_COUNT_ATTRS = ("num_key_value_heads", "num_kv_heads")
HEADS_WIDTH_ATTRS = ("all_head_size", "split_size", "inner_dim")
FFN_WIDTH_ATTRS = ("intermediate_size", "ffn_dim")


@dataclass(frozen=True)
class BlockAnatomy:
    """The structured roles inside one block, by qualified module name.

    `q` / `kv` (key, value) are separate projections, or `fused` holds all three stacked along the
    output rows (GPT-2's c_attn: [q; k; v]); `o` is the attention output projection; `ffn_in` the FFN
    input projections (up, and gate where the FFN is gated), `ffn_out` its output projection;
    `attention` / `ffn` the smallest modules holding them (whose count attributes change with them).
    """

    index: int
    block: str
    q: str | None
    kv: tuple[str, ...]
    fused: str | None
    o: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    attention: str
    ffn: str
    heads: int
    kv_heads: int
    head_dim: int
    ffn_width: int

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (the folder manifest keeps it), read back by `from_json`."""
        body = asdict(self)
        body["kv"], body["ffn_in"] = list(self.kv), list(self.ffn_in)
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BlockAnatomy:
        """The inverse of `to_json`.

        Example:
            >>> a = BlockAnatomy(0, "b", "b.q", ("b.k", "b.v"), None, "b.o", ("b.up",), "b.down", "b", "b", 2, 2, 4, 8)
            >>> BlockAnatomy.from_json(a.to_json()) == a
            True
        """
        return cls(**{**body, "kv": tuple(body["kv"]), "ffn_in": tuple(body["ffn_in"])})


def model_type(model: nn.Module) -> str:
    """The model's `config.model_type` ('<no config>' when it has none).

    Example:
        >>> model_type(nn.Linear(2, 2))
        '<no config>'
    """
    return str(getattr(getattr(model, "config", None), "model_type", None) or "<no config>")


def check_family(model: nn.Module, what: str) -> str:
    """The model type, or UnsupportedModelError naming it and the supported families.

    Example:
        >>> check_family(nn.Linear(2, 2), "structured pattern 'channel'")
        Traceback (most recent call last):
        ...
        sparsepress.errors.UnsupportedModelError: <no config>: structured pattern 'channel' is not supported: ...
    """
    kind = model_type(model)
    if kind not in STRUCTURED_FAMILIES:
        raise UnsupportedModelError(kind, what, "structured surgery knows the families " + ", ".join(STRUCTURED_FAMILIES))
    return kind


def config_dims(config: Any) -> tuple[int, int, int, int]:
    """(hidden size, attention heads, key/value heads, head size) from a transformers config.

    Example:
        >>> from transformers import BertConfig
        >>> config_dims(BertConfig(hidden_size=64, num_attention_heads=4))
        (64, 4, 4, 16)
    """
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    return hidden, heads, kv_heads, head_dim


@dataclass(eq=False)
class _Call:
    name: str
    input: torch.Tensor
    in_features: int
    out_features: int


def _dummy_batch(model: nn.Module) -> dict[str, torch.Tensor]:
    vocab = int(getattr(model.config, "vocab_size", 8) or 8)
    ids = (torch.arange(8) % max(vocab - 4, 1) + min(4, vocab - 1)).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _trace(model: nn.Module, names: list[str]) -> list[_Call]:
    """The first call of each named Linear during one forward of dummy tokens, in call order."""
    from ..passes.blocks import forward_kwargs

    calls: list[_Call] = []
    seen: set[str] = set()

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen:
                seen.add(name)
                calls.append(_Call(name, args[0], module.in_features, module.out_features))
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            model(**_dummy_batch(model), **forward_kwargs(model))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _ancestor(names: list[str]) -> str:
    """The longest common module path of two or more distinct module names."""
    common = []
    for column in zip(*(n.split(".") for n in names)):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common)


def _classify(index: int, block: str, calls: list[_Call], dims: tuple[int, int, int, int], kind: str) -> BlockAnatomy:
    hidden, heads, kv_heads, head_dim = dims
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
    groups: list[list[_Call]] = []
    for call in calls:
        owner = next((g for g in groups if g[0].input is call.input), None)
        if owner is None:
            groups.append([call])
        else:
            owner.append(call)

    def fail(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(kind, f"structured surgery of block {block!r}", reason)

    position = next((i for i, g in enumerate(groups)
                     if all(c.in_features == hidden for c in g) and sum(c.out_features for c in g) == q_rows + 2 * kv_rows
                     and len(g) in (1, 3)), None)
    if position is None:
        raise fail(f"no query/key/value projections of {heads} heads x {head_dim} (+ {kv_heads} key/value heads) found")
    attn = groups[position]
    q = fused = None
    kv: tuple[str, ...] = ()
    if len(attn) == 1:
        fused = attn[0].name
    else:
        q_call = next(c for c in attn if c.out_features == q_rows)
        q, kv = q_call.name, tuple(c.name for c in attn if c is not q_call)
        if any(c.out_features != kv_rows for c in attn if c is not q_call):
            raise fail("key/value projections of unequal width")
    rest = [c for g in groups[position + 1:] for c in g]
    o_call = next((c for c in rest if c.in_features == q_rows and c.out_features == hidden), None)
    if o_call is None:
        raise fail("no attention output projection after the query/key/value projections")
    after_o = [g for g in groups[position + 1:] if calls.index(g[0]) > calls.index(o_call)]
    ffn_group = next((g for g in after_o if all(c.in_features == hidden for c in g)
                      and len({c.out_features for c in g}) == 1 and g[0] is not o_call), None)
    if ffn_group is None:
        raise fail("no FFN input projection after the attention")
    width = ffn_group[0].out_features
    ffn_out = next((c for c in calls[calls.index(ffn_group[-1]) + 1:] if c.in_features == width and c.out_features == hidden), None)
    if ffn_out is None:
        raise fail(f"no FFN output projection from {width} back to {hidden}")
    placed = {c.name for c in attn} | {o_call.name, ffn_out.name} | {c.name for c in ffn_group}
    stray = sorted(c.name for c in calls if c.name not in placed)
    if stray:
        raise fail(f"Linear layers outside the attention-then-FFN pattern: {', '.join(stray)}")
    attention = _ancestor([c.name for c in attn] + [o_call.name])
    ffn = _ancestor([c.name for c in ffn_group] + [ffn_out.name])
    return BlockAnatomy(index, block, q, kv, fused, o_call.name, tuple(c.name for c in ffn_group), ffn_out.name,
                        attention, ffn, heads, kv_heads, head_dim, width)


def block_anatomies(model: nn.Module, what: str = "structured surgery") -> list[BlockAnatomy]:
    """The structured roles of every block of a transformers model (see the module example).

    UnsupportedModelError names the model type and what is missing when a block does not read as
    attention-then-FFN with the config's head counts, or the family is not one of `STRUCTURED_FAMILIES`.
    """
    kind = check_family(model, what)
    dims = config_dims(model.config)
    if dims[1] % dims[2]:
        raise UnsupportedModelError(kind, what, f"{dims[1]} query heads do not split into {dims[2]} key/value groups")
    layout = find_layout(model)
    if layout.blocks == [("", model)]:
        raise UnsupportedModelError(kind, what, "no transformer blocks found")
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and layout.block_of(n) is not None]
    calls = _trace(model, linears)
    by_block: dict[int, list[_Call]] = {}
    for call in calls:
        by_block.setdefault(layout.block_of(call.name), []).append(call)  # type: ignore[arg-type]
    return [_classify(i, name, by_block.get(i, []), dims, kind) for i, (name, _) in enumerate(layout.blocks)]
