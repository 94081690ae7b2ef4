"""Compressing models larger than memory: weights stay in their safetensors files until their block is solved.

`open_streamed` builds the model's skeleton with every parameter on the meta device (buffers, such as
rotary frequencies, are real) and returns it with a `StreamedWeights` reader. `sp.compress(...,
weights=reader)` then loads what runs before the first block (embeddings), and the layer solve loads
each block's tensors just before solving it, tensor by tensor (one `safe_open` per tensor, so no file
stays mapped), converts them from the file's dtype (bf16 / fp16 / fp32) to float32 only then, and puts
the replaced dense Linear weights back on the meta device once the block is packed. What runs after
the blocks (final norm, untied head) is loaded last. The peak holds the packed blocks, the embeddings
and one dense block with its solve's work, never the dense model.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> folder = tempfile.mkdtemp()
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).to(torch.bfloat16).save_pretrained(folder)
    >>> model, weights = open_streamed(folder)
    >>> model.model.layers[0].mlp.up_proj.weight.device.type
    'meta'
    >>> recipe = {"stages": [{"prune": {"method": "wanda", "sparsity": 0.5}}, {"quantize": {"method": "rtn"}}]}
    >>> model = sp.compress(model, recipe, calibration=[torch.randint(0, 100, (16,))], weights=weights)
    >>> type(model.model.layers[1].mlp.up_proj).__name__, model.lm_head.weight.dtype
    ('SparseLinear', torch.float32)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import InputError, RecipeError
from .models import BLOCK_PATHS, find_layout

# Families whose skeleton, key names and forward up to the first block were checked with streaming
# (tests/test_stream.py): dense decoders with grouped-query attention and BERT-style encoders.
STREAMING_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "bert", "roberta")
# The passes that run unchanged on a streamed model: the layer solve loads each block itself, and the
# passes ordered after it see a fully loaded (packed) model. Anything else reads every dense weight first.
STREAMING_PASSES = ("allocation", "layer_solve", "embeddings", "activation_sparsity")
STREAMING_STAGES = ("prune", "quantize", "quantize_embeddings", "activation_sparsity")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and keep real buffers.

    A parameter moves to meta as it is registered, before any initializer runs, so building a
    7B-parameter skeleton neither allocates nor fills its weights; buffers computed in `__init__`
    (rotary frequencies, position ids) keep their values, which the checkpoint often lacks.

    Example:
        >>> with parameters_on_meta():
        ...     layer = nn.BatchNorm1d(4)
        >>> layer.weight.device.type, layer.running_mean.device.type
        ('meta', 'cpu')
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (one file, or a sharded index).

    Example:
        >>> import tempfile; from safetensors.torch import save_file
        >>> folder = Path(tempfile.mkdtemp()); save_file({"w": torch.ones(1)}, str(folder / "model.safetensors"))
        >>> tensor_files(folder)["w"].name
        'model.safetensors'
    """
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(index, f"cannot read the shard index: {exc}") from None
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise InputError(folder, "streaming reads safetensors weights: no model.safetensors or its index")
    try:
        with safe_open(str(single), "pt") as handle:
            return {name: single for name in handle.keys()}
    except (OSError, SafetensorError) as exc:
        raise InputError(single, f"cannot read the weights: {exc}") from None


@dataclass
class StreamedWeights:
    """Reads a model folder's tensors one at a time and loads them into a meta-device skeleton, in place.

    `files`: tensor name -> safetensors file; `prefix`: the model's `base_model_prefix` (checkpoints of a
    task model name the base model's tensors with it, a base model's without); `dtype`: what tensors
    become once read (the dtype the solve and the forward run in); `buffers`: the skeleton's persistent
    buffers that the files hold, still to read (`open_streamed` fills it). See the module example.

    Example:
        >>> weights = StreamedWeights(files={"bert.pooler.dense.weight": Path("model.safetensors")}, prefix="bert")
        >>> weights.key_of("pooler.dense.weight")
        'bert.pooler.dense.weight'
    """

    files: dict[str, Path]
    prefix: str = ""
    dtype: torch.dtype = torch.float32
    buffers: set[str] = field(default_factory=set)
    # The modules this reader filled, by name: once the solve has replaced one, its dense tensors go.
    _loaded: dict[str, nn.Module] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: str | Path, prefix: str = "") -> StreamedWeights:
        """A reader for the safetensors files of `folder` (InputError naming what is missing)."""
        return cls(files=tensor_files(Path(folder)), prefix=prefix)

    def key_of(self, name: str) -> str | None:
        """The file's name for the model's tensor `name` (with or without the base model prefix), or None."""
        candidates = [name]
        if self.prefix:
            candidates += [f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")]
        return next((key for key in candidates if key in self.files), None)

    def read(self, name: str) -> torch.Tensor:
        """The model's tensor `name` from its file, as `self.dtype`; InputError naming the file when absent."""
        key = self.key_of(name)
        if key is None:
            raise InputError(next(iter(self.files.values()), Path(".")).parent,
                             f"tensor {name!r} is missing from the safetensors files")
        try:
            with safe_open(str(self.files[key]), "pt") as handle:  # mapped for this one tensor only
                tensor = handle.get_tensor(key)
        except (OSError, SafetensorError) as exc:
            raise InputError(self.files[key], f"cannot read tensor {key!r}: {exc}") from None
        return tensor.to(self.dtype) if tensor.is_floating_point() else tensor

    def load_(self, model: nn.Module, names: Sequence[str]) -> None:
        """Load the modules `names` (qualified names; '' is the whole model): every meta parameter under
        them, each once (tied parameters share the one tensor read), and the buffers the files hold."""
        tied = _tied_names(model)
        for module_name in names:
            root = model.get_submodule(module_name)
            for sub_name, module in root.named_modules(prefix=module_name):
                filled = False
                for leaf, param in list(module._parameters.items()):
                    if param is not None and param.is_meta:
                        full = f"{sub_name}.{leaf}" if sub_name else leaf
                        self._fill_parameter(model, tied.get(id(param), [full]), param.requires_grad)
                        filled = True
                for leaf, buffer in list(module._buffers.items()):
                    full = f"{sub_name}.{leaf}" if sub_name else leaf
                    if buffer is not None and full in self.buffers:  # once: later modules may reuse the name
                        module._buffers[leaf] = self.read(full).to(buffer.dtype)
                        self.buffers.discard(full)
                if filled:
                    self._loaded[sub_name] = module

    def _fill_parameter(self, model: nn.Module, names: list[str], requires_grad: bool) -> None:
        source = next((n for n in names if self.key_of(n) is not None), names[0])
        param = nn.Parameter(self.read(source), requires_grad=requires_grad)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = param

    def release_replaced_(self, model: nn.Module, under: str) -> None:
        """Drop the dense tensors of loaded modules under `under` that the model no longer holds
        (Linear layers the solve replaced by packed ones): they go back to the meta device."""
        for name in [n for n in self._loaded if n == under or n.startswith(f"{under}.")]:
            module = self._loaded[name]
            try:
                current = model.get_submodule(name)
            except AttributeError:
                current = None
            if current is not module:
                for leaf, param in module._parameters.items():
                    if param is not None and not param.is_meta:
                        module._parameters[leaf] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
                del self._loaded[name]

    def load_before_blocks_(self, model: nn.Module) -> None:
        """Load what runs before the first block (embeddings): the modules registered before it.

        Hugging Face models register their modules in the order they run, so the final norm and an
        untied head wait for `load_rest_`, after the blocks, rather than sit beside the solve's peak.
        """
        first_block = find_layout(model).blocks[0][0]
        before: list[str] = []
        for name, module in model.named_modules():
            if name == first_block:
                break
            if module._parameters and not first_block.startswith(f"{name}."):
                before.append(name)
        self.load_(model, before)

    def load_rest_(self, model: nn.Module) -> None:
        """Load every parameter still on the meta device (what runs after the blocks)."""
        self.load_(model, [""])


def _tied_names(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> every qualified name it has (tied embeddings and heads have two)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return names


def check_streamable_type(model_type: str, where: str | Path) -> None:
    """InputError naming `where` for a model family streaming does not support.

    Example:
        >>> check_streamable_type("gpt2", "m/config.json")
        Traceback (most recent call last):
        ...
        sparsepress.errors.InputError: m/config.json: streaming supports model types llama | mistral | qwen2 | qwen3 | bert | roberta, not 'gpt2'; compress it without streaming
    """
    if model_type not in STREAMING_FAMILIES or model_type not in BLOCK_PATHS:
        raise InputError(where, f"streaming supports model types {' | '.join(STREAMING_FAMILIES)}, not {model_type!r}; "
                                "compress it without streaming")


def open_streamed(folder: str | Path, config: Any = None) -> tuple[nn.Module, StreamedWeights]:
    """The model of a Hugging Face folder as a skeleton (parameters on meta) and the reader of its weights.

    The skeleton is the class `sources.load_source` would load, in float32 eval mode; pass it and the
    reader to `sp.compress(..., weights=...)`. See the module example.
    """
    from transformers import AutoConfig

    from .sources import check_model_type, model_class_for

    folder = Path(folder)
    check_model_type(folder / "config.json")
    if config is None:
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, json.JSONDecodeError) as exc:
            raise InputError(folder / "config.json", f"cannot read the model config: {exc}") from None
    check_streamable_type(config.model_type, folder / "config.json")
    weights = StreamedWeights.open(folder)
    config.dtype = torch.float32  # what the in-memory loader records: the model computes in float32
    cls = model_class_for(folder, config)
    with parameters_on_meta():
        model = cls(config)
    weights.prefix = getattr(model, "base_model_prefix", "") or ""
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    weights.buffers = {name for name in model.state_dict(keep_vars=True)
                       if name not in parameters and weights.key_of(name) is not None}
    return model.eval(), weights


def is_streamed(model: nn.Module) -> bool:
    """Whether some parameter of `model` is still on the meta device (not loaded).

    Example:
        >>> is_streamed(nn.Linear(2, 2)), is_streamed(nn.Linear(2, 2, device="meta"))
        (False, True)
    """
    return any(param.is_meta for param in model.parameters())


def check_streamable_run(model: nn.Module, recipe: Any, passes: Sequence[Any], weights: StreamedWeights | None) -> None:
    """Refuse, before any work, a streamed run that would need the whole dense model in memory.

    A model with unloaded (meta) parameters needs its reader; the recipe needs a layer solve (it is what
    loads the blocks) and only passes that work block by block or on the packed model.

    Example:
        >>> check_streamable_run(nn.Linear(2, 2, device="meta"), None, [], None)
        Traceback (most recent call last):
        ...
        sparsepress.errors.InputError: <model>: its parameters are on the meta device; pass the reader that came with it (sp.compress(..., weights=...), from sparsepress.stream.open_streamed)
    """
    if weights is None:
        if is_streamed(model):
            raise InputError("<model>", "its parameters are on the meta device; pass the reader that came with it "
                                        "(sp.compress(..., weights=...), from sparsepress.stream.open_streamed)")
        return
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    check_streamable_type(model_type, "<model>")
    names = [step.name for step in passes]
    if "layer_solve" not in names:
        raise RecipeError("stages", "no prune or quantize stage", "a prune or quantize stage when streaming "
                          "(the layer solve is what reads each block from disk)")
    for kind in [stage.kind for stage in recipe.stages] + (["budget"] if recipe.budget is not None else []):
        if kind not in STREAMING_STAGES:
            raise RecipeError(f"stages.{kind}" if kind != "budget" else kind, kind,
                              f"{' | '.join(STREAMING_STAGES)} when streaming ({kind} reads the whole dense model); "
                              "compress without streaming")
    prune = recipe.prune
    if prune is not None and prune.allocation != "uniform":
        raise RecipeError("prune.allocation", prune.allocation, "uniform when streaming (owl and sensitivity read "
                          "every layer's inputs before the solve); compress without streaming")
    for step in passes:  # what the stages plan beyond the layer solve (structured removal, ...)
        if step.name not in STREAMING_PASSES:
            raise RecipeError("stages", step.name, f"passes {' | '.join(STREAMING_PASSES)} when streaming (the "
                              f"{step.name} pass reads the whole dense model); compress without streaming")
