"""Where a model keeps its transformer blocks, Linear layers and embedding tables.

Adapters are looked up by `config.model_type`; anything else gets the generic adapter, which takes
the largest ModuleList of identical Linear-holding modules as the blocks (or, failing that, the
whole model as one block, so every nn.Linear is still reached).

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    >>> layout = find_layout(model)
    >>> [name for name, _ in layout.blocks], layout.adapter
    (['encoder.layer.0', 'encoder.layer.1'], 'bert')
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

# model_type -> dotted path of the ModuleList holding the blocks. Families differ only in this path,
# so a table (not code) is the adapter; unknown types fall through to the generic search.
BLOCK_PATHS: dict[str, str] = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "xlm-roberta": "encoder.layer",
    "mpnet": "encoder.layer",
    "electra": "encoder.layer",
    "distilbert": "transformer.layer",
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "mixtral": "model.layers",
    "qwen2_moe": "model.layers",
    "qwen3_moe": "model.layers",
    "olmoe": "model.layers",
    "gemma": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "opt": "model.decoder.layers",
}


@dataclass
class ModelLayout:
    """Blocks (in execution order) and embedding tables of a model, by qualified name."""

    adapter: str
    blocks: list[tuple[str, nn.Module]]
    embeddings: list[tuple[str, nn.Embedding]] = field(default_factory=list)

    def block_of(self, module_name: str) -> int | None:
        """Index of the block that owns `module_name`, or None when it lies outside every block."""
        for index, (name, _) in enumerate(self.blocks):
            if name == "" or module_name == name or module_name.startswith(name + "."):
                return index
        return None


def linear_layers(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """Every nn.Linear under `module`, with qualified names, in registration order.

    Example:
        >>> [n for n, _ in linear_layers(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))]
        ['0', '2']
    """
    found = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear):
            found.append((f"{prefix}.{name}" if prefix and name else (name or prefix), child))
    return found


def _resolve(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        pass
    # Task heads (ForCausalLM, ForSequenceClassification) nest the base model one level down.
    for prefix in ("base_model", getattr(model, "base_model_prefix", "")):
        inner = getattr(model, prefix, None) if prefix else None
        if isinstance(inner, nn.Module) and inner is not model:
            for relative in dict.fromkeys((path, path.split(".", 1)[1] if path.count(".") else path)):
                try:  # the path as given (BERT's encoder.layer under a classifier), or without its first part
                    return inner.get_submodule(relative)
                except AttributeError:
                    continue
    return None


def _generic_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 1:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not linear_layers(module[0]):
            continue
        if len(module) > len(best):
            best = [(f"{name}.{i}", child) for i, child in enumerate(module)]
    return best


def _qualified(model: nn.Module, target: nn.Module) -> str:
    return next(name for name, module in model.named_modules() if module is target)


def find_layout(model: nn.Module) -> ModelLayout:
    """The blocks and embedding tables of `model` (see module docstring for the rules)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    blocks: list[tuple[str, nn.Module]] = []
    adapter = "generic"
    path = BLOCK_PATHS.get(model_type or "")
    container = _resolve(model, path) if path else None
    if isinstance(container, nn.ModuleList):
        base = _qualified(model, container)
        blocks = [(f"{base}.{i}", child) for i, child in enumerate(container)]
        adapter = model_type or "generic"
    if not blocks:
        blocks = _generic_blocks(model)
    if not blocks:
        blocks = [("", model)]
    embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
    return ModelLayout(adapter=adapter, blocks=blocks, embeddings=embeddings)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` is.

    Example:
        >>> seq = nn.Sequential(nn.Linear(2, 2))
        >>> replace_module(seq, "0", nn.Identity()); type(seq[0]).__name__
        'Identity'
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def convert_conv1d_(model: nn.Module) -> nn.Module:
    """Turn GPT-2 style `Conv1D` layers (weight [in, out]) into equivalent nn.Linear, in place.

    Example:
        >>> convert_conv1d_(nn.Sequential(nn.Linear(2, 2)))[0].__class__.__name__
        'Linear'
    """
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always ships it today
        return model
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape
            linear = nn.Linear(in_features, out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            replace_module(model, name, linear)
    return model
