"""Read a compressed-tensors folder (llm-compressor's output) onto sparsepress's packed formats.

Each compressed Linear becomes a `SparseLinear` without passing through a dense float weight: the stored
integer codes (bitmask values, 2:4 values, int32-packed words or plain int8) are laid out as our
`bitmask` / `nm` / `dense` format with the folder's scales. Symmetric schemes map one to one. Zero points
(asymmetric schemes) are subtracted from the codes: exact whenever `code - zero_point` fits int8, which
always holds up to 7 bits (int4 with zero points becomes int8 codes in [-15, 15] with the same group
scales); 8-bit codes whose shifted range leaves int8 are refused, naming the layer. `g_idx` is accepted
when it keeps groups contiguous (activation order within groups); a permuted grouping is refused.
Activation settings (static scales, fp8 activations) are not needed: sparsepress quantizes activations
per token at run time. Layers no scheme covers stay as they are (dense float `nn.Linear`).

Example:
    >>> is_compressed_tensors_folder("/nonexistent")
    False
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ... import __version__
from ...errors import FormatError, TensorLayoutError
from ...formats import BitmaskWeight, DenseWeight, NMWeight, PackedWeight
from ...formats.base import bits_to_mask
from ...models import replace_module
from ...nn import SparseLinear
from .scheme import IGNORED_SUFFIXES, QUANT_METHOD, CompressedTensorsConfig, WeightArgs, scheme_of, sparsity_structure

# Per-layer tensors of compressed-tensors' compressors (module path + "." + one of these).
SPARSE_PARAMS = ("compressed", "bitmask", "row_offsets", "shape")
QUANT_PARAMS = ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point", "weight_g_idx")
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def is_compressed_tensors_folder(folder: str | Path) -> bool:
    """Whether `folder` is a Hugging Face folder whose config says `quant_method: compressed-tensors`
    (and is not a sparsepress folder).

    Example:
        >>> import tempfile; d = Path(tempfile.mkdtemp())
        >>> _ = (d / "config.json").write_text('{"quantization_config": {"quant_method": "compressed-tensors"}}')
        >>> is_compressed_tensors_folder(d)
        True
    """
    folder = Path(folder)
    config = folder / "config.json"
    if not config.is_file() or (folder / "sparsepress.json").exists():
        return False
    try:
        entry = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False
    return isinstance(entry, dict) and entry.get("quant_method") == QUANT_METHOD


def read_config(folder: Path) -> CompressedTensorsConfig:
    """The folder's validated compression config; FormatError naming everything that cannot be run."""
    path = folder / "config.json"
    raw = json.loads(path.read_text(encoding="utf-8"))["quantization_config"]
    try:
        config = CompressedTensorsConfig.model_validate(raw)
    except ValueError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", lambda: [])())
        raise FormatError(path, f"compressed-tensors quantization_config not supported: {problems or exc}") from None
    problems = config.problems()
    if problems:
        raise FormatError(path, "compressed-tensors folder not supported: " + "; ".join(problems))
    if config.kv_cache_scheme:
        warnings.warn(f"{path}: kv_cache_scheme ignored (sparsepress keeps the KV cache in float32)", stacklevel=3)
    return config


class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint, read on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise FormatError(index, f"unreadable safetensors index: {exc}") from None
            self.files = {key: folder / name for key, name in weight_map.items()}
        elif (folder / SINGLE).is_file():
            with self._open(folder / SINGLE) as handle:
                self.files = dict.fromkeys(handle.keys(), folder / SINGLE)
        else:
            raise FormatError(folder, f"no {SINGLE} or {INDEX}")
        for path in set(self.files.values()):
            if not path.is_file():
                raise FormatError(path, "missing shard named by the safetensors index")

    @staticmethod
    def _open(path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise FormatError(path, f"unreadable safetensors data: {exc}") from None

    def get(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The tensors named `keys`, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.files[key], []).append(key)
        out = {}
        for path, names in by_file.items():
            with self._open(path) as handle:
                out.update({key: handle.get_tensor(key) for key in names})
        return out

    @property
    def file_names(self) -> list[str]:
        return sorted({p.name for p in self.files.values()})


def compressed_layers(keys: list[str] | set[str]) -> dict[str, list[str]]:
    """Module path -> its compression tensor suffixes, for every module that has any.

    Example:
        >>> compressed_layers(["a.q.weight_packed", "a.q.weight_scale", "a.norm.weight"])
        {'a.q': ['weight_packed', 'weight_scale']}
    """
    layers: dict[str, list[str]] = {}
    for key in sorted(keys):
        path, _, suffix = key.rpartition(".")
        if suffix in SPARSE_PARAMS or suffix in QUANT_PARAMS:
            layers.setdefault(path, []).append(suffix)
    return layers


def _unpack_int32(packed: torch.Tensor, bits: int, count: int, dim: int) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32` inverse: `32 // bits` offset-unsigned codes per int32 word,
    lowest bits first, along `dim`; returns signed codes (int16) cut to `count` along that dim."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed words must be int32, got {packed.dtype}")
    words = packed if dim == 1 else packed.t()
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32) * bits
    codes = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    codes = codes.reshape(words.shape[0], -1)[:, :count].to(torch.int16) - (1 << (bits - 1))
    return codes if dim == 1 else codes.t().contiguous()


def stored_grid(parts: dict[str, torch.Tensor], args: WeightArgs | None) -> torch.Tensor:
    """The weight as stored, [out, in]: integer codes (int16) for quantized layers, else float."""
    if "compressed" in parts or "bitmask" in parts:
        shape = [int(v) for v in parts["shape"].flatten().tolist()]
        if len(shape) != 2:
            raise ValueError(f"shape must hold two sizes, got {shape}")
        keep = bits_to_mask(parts["bitmask"], shape[1])
        values = parts["compressed"].flatten()
        if keep.shape != (shape[0], shape[1]) or int(keep.sum()) != values.numel():
            raise ValueError(f"bitmask keeps {int(keep.sum())} entries but {values.numel()} values are stored")
        grid = torch.zeros(shape, dtype=values.dtype)
        grid[keep] = values
    elif "weight_packed" in parts:
        if args is None:
            raise ValueError("int32-packed weights but no quantization scheme covers the layer")
        rows, cols = (int(v) for v in parts["weight_shape"].flatten().tolist())
        grid = _unpack_int32(parts["weight_packed"], args.num_bits, cols, dim=1)
        if grid.shape != (rows, cols):
            raise ValueError(f"weight_packed unpacks to {list(grid.shape)}, weight_shape says {[rows, cols]}")
        return grid
    else:
        grid = parts["weight"]
    if args is not None:
        if grid.is_floating_point():
            raise ValueError(f"quantized layer stores float weights ({grid.dtype})")
        return grid.to(torch.int16)
    if not grid.is_floating_point():
        raise ValueError(f"integer weights ({grid.dtype}) but no quantization scheme covers the layer")
    return grid.float()


def _group_layout(scale: torch.Tensor, args: WeightArgs, rows: int, cols: int) -> tuple[torch.Tensor, int | None, int]:
    """Scales as [rows, groups] float32 with our group size (None: one per row) and the rows per block."""
    scale = scale.float()
    strategy = args.strategy
    if strategy == "block" or (strategy is None and scale.dim() == 2 and 1 < scale.shape[0] < rows):
        block_rows, block_cols = args.block_structure or (math.ceil(rows / scale.shape[0]), math.ceil(cols / scale.shape[1]))
        scale = scale.repeat_interleave(block_rows, dim=0)[:rows]
        return scale.contiguous(), (None if block_cols >= cols else block_cols), block_rows
    if scale.numel() == 1:
        return scale.reshape(1, 1).expand(rows, 1).contiguous(), None, rows
    scale = scale.reshape(rows, -1)
    groups = scale.shape[1]
    if groups == 1:
        return scale.contiguous(), None, 1
    size = args.group_size or cols // groups
    if math.ceil(cols / size) != groups:
        raise ValueError(f"{groups} scale groups do not fit {cols} inputs in groups of {size}")
    return scale.contiguous(), size, 1


def _zero_points(parts: dict[str, torch.Tensor], args: WeightArgs, scales: torch.Tensor, block_rows: int) -> torch.Tensor:
    """Zero points as [rows, groups] int16 (zeros for symmetric schemes)."""
    rows, groups = scales.shape
    zero = parts.get("weight_zero_point")
    if args.symmetric or zero is None:
        if not args.symmetric:
            raise ValueError("asymmetric scheme but no weight_zero_point stored")
        return torch.zeros(rows, groups, dtype=torch.int16)
    if zero.dtype == torch.int32 and "weight_packed" in parts:
        zero = _unpack_int32(zero, args.num_bits, rows, dim=0)
    zero = zero.to(torch.int16)
    if zero.numel() == 1:
        return zero.reshape(1, 1).expand(rows, groups).contiguous()
    if block_rows > 1:
        zero = zero.repeat_interleave(block_rows, dim=0)[:rows]
    return zero.reshape(rows, groups).contiguous()


def _check_g_idx(parts: dict[str, torch.Tensor], cols: int, group_size: int | None) -> None:
    g_idx = parts.get("weight_g_idx")
    if g_idx is None or bool((g_idx == -1).any()):  # -1: never set, columns in order
        return
    expected = torch.arange(cols) // (group_size or cols)
    if g_idx.numel() != cols or not torch.equal(g_idx.long().flatten(), expected):
        raise ValueError("activation-ordered groups (g_idx) that are not contiguous column ranges are not supported; "
                         "quantize with actorder 'weight' (static) or none")


def quantized_codes(parts: dict[str, torch.Tensor], grid: torch.Tensor, args: WeightArgs) -> tuple[torch.Tensor, torch.Tensor, int | None, str]:
    """(codes int8 [out, in] with zero points removed, scales [out, groups], group size, our dtype)."""
    rows, cols = grid.shape
    scales, group_size, block_rows = _group_layout(parts["weight_scale"], args, rows, cols)
    _check_g_idx(parts, cols, group_size)
    zero = _zero_points(parts, args, scales, block_rows)
    size = group_size or cols
    if zero.any():
        zero_full = zero.repeat_interleave(size, dim=1)[:, :cols] if group_size else zero.expand(rows, cols)
        grid = grid - zero_full
    low, high = int(grid.min()), int(grid.max())
    if args.num_bits <= 4 and low >= -8 and high <= 7:
        dtype = "int4"
    elif -128 <= low and high <= 127:
        dtype = "int8"
    else:
        raise ValueError(f"codes minus zero points span [{low}, {high}], beyond int8: sparsepress's int8 kernels "
                         "are symmetric (asymmetric 8-bit weights are not supported)")
    empty = (scales <= 0) | ~torch.isfinite(scales)
    if bool(empty.any()):
        # a group whose codes are all zero may carry a zero scale; any positive scale gives the same weights
        group_codes = torch.nn.functional.pad(grid.abs(), (0, scales.shape[1] * size - cols)).view(rows, -1, size).amax(-1)
        if bool((group_codes[empty] != 0).any()):
            raise ValueError("non-positive or non-finite scales for non-zero weights")
        scales = torch.where(empty, torch.ones_like(scales), scales)
    return grid.to(torch.int8), scales, group_size, dtype


def packed_weight(grid: torch.Tensor, dtype: str, scales: torch.Tensor | None, group_size: int | None,
                  structure: str | None) -> PackedWeight:
    """Lay a stored grid (int8 codes or float32) out in our format: 2:4 as `nm`, other declared sparsity
    as `bitmask`, else `dense`. The grid is used as is: no re-quantization."""
    candidates: list[tuple[type[PackedWeight], dict[str, int]]] = []
    if structure == "2:4" and grid.shape[1] % 4 == 0:
        candidates.append((NMWeight, {"n": 2, "m": 4}))
    if structure is not None and bool((grid == 0).any()):
        candidates.append((BitmaskWeight, {}))
    candidates.append((DenseWeight, {}))
    for cls, params in candidates:
        try:
            layout = cls._layout(grid, dtype=dtype, **params)
        except ValueError:
            continue
        packed = cls(shape=tuple(grid.shape), dtype=dtype, scales=scales, group_size=group_size, **layout)  # type: ignore[arg-type]
        packed._check()
        return packed
    raise AssertionError("the dense layout fits every grid")  # pragma: no cover


def layer_module(config: CompressedTensorsConfig, name: str, module: nn.Module, parts: dict[str, torch.Tensor],
                 where: Path) -> nn.Module:
    """The module that replaces `name`: a SparseLinear on our formats (or a float nn.Linear when dense)."""
    if not isinstance(module, nn.Linear):
        raise TensorLayoutError(where, f"layer '{name}': compressed weights on a {type(module).__name__}, "
                                       "only Linear layers are supported")
    found = scheme_of(config, name, module)
    args = None
    if found is not None and config.format_of(found[0]) != "dense":
        args = found[1].weights
    structure = sparsity_structure(config, name, module)
    if "compressed" in parts and parts["compressed"].dim() == 2:  # sparse-24-bitmask's [out, in/2] values
        structure = "2:4"
    try:
        grid = stored_grid(parts, args)
        if tuple(grid.shape) != (module.out_features, module.in_features):
            raise ValueError(f"weight is {list(grid.shape)}, the model expects {[module.out_features, module.in_features]}")
        if args is None:
            if structure is None:
                linear = nn.Linear(module.in_features, module.out_features, bias=False)
                linear.weight = nn.Parameter(grid.contiguous(), requires_grad=False)
                return linear
            packed = packed_weight(grid, "fp32", None, None, structure)  # float weights: fp32 holds bf16 / fp16 exactly
        else:
            codes, scales, group_size, dtype = quantized_codes(parts, grid, args)
            packed = packed_weight(codes, dtype, scales, group_size, structure)
    except (ValueError, KeyError, RuntimeError) as exc:
        detail = f"missing tensor {exc}" if isinstance(exc, KeyError) else str(exc)
        raise TensorLayoutError(where, f"layer '{name}': {detail}") from None
    return SparseLinear(packed, None)


def install_layers_(model: nn.Module, folder: Path) -> list[str]:
    """Replace every compressed Linear of `model` with its packed module; the checkpoint keys consumed.

    Biases stay with the dense tensors (the caller loads them into the new modules' `bias`).
    """
    folder = Path(folder)
    config = read_config(folder)
    checkpoint = Checkpoint(folder)
    where = folder / (INDEX if (folder / INDEX).is_file() else SINGLE)
    consumed: list[str] = []
    modules = dict(model.named_modules())
    for name, suffixes in compressed_layers(checkpoint.files).items():
        if name not in modules:
            raise TensorLayoutError(where, f"compressed layer '{name}' does not exist in {type(model).__name__}")
        keys = [f"{name}.{s}" for s in suffixes]
        if f"{name}.weight" in checkpoint.files:
            keys.append(f"{name}.weight")
        parts = {k.rpartition(".")[2]: v for k, v in checkpoint.get(keys).items()}
        new = layer_module(config, name, modules[name], parts, where)
        if isinstance(new, SparseLinear) and modules[name].bias is not None:
            new.register_buffer("bias", torch.zeros(new.out_features))
        replace_module(model, name, new)
        consumed += keys
    model.sparsepress_manifest = synthesized_manifest(model, folder, checkpoint)  # type: ignore[assignment]
    return consumed


def synthesized_manifest(model: nn.Module, folder: Path, checkpoint: Checkpoint) -> dict[str, Any]:
    """A sparsepress-style manifest of the layers as read (for `inspect`, `eval`, `sp.save` history)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            meta = module.packed.meta()
            meta.update({"bias": module.bias is not None, "sparsity": round(module.packed.sparsity, 6),
                         "nbytes": module.nbytes, "pattern": _pattern(module.packed)})
            layers[name] = meta
    return {
        "format_version": 1, "library_version": __version__, "model_class": type(model).__name__, "source": None,
        "sentence_transformers": (folder / "modules.json").is_file(), "recipe": None, "adapter": None,
        "layers": layers, "embeddings": {}, "aliases": {}, "origin": QUANT_METHOD,
        "tensors_files": checkpoint.file_names,
    }


def _pattern(packed: PackedWeight) -> str:
    if isinstance(packed, NMWeight):
        return f"{packed.n}:{packed.m}"
    return "unstructured" if isinstance(packed, BitmaskWeight) else "dense"


def dense_tensors(folder: Path, consumed: list[str]) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor the packed layers did not take, less activation / KV-cache parameters."""
    checkpoint = Checkpoint(folder)
    taken = set(consumed)
    keys = [k for k in checkpoint.files if k not in taken and not k.endswith(IGNORED_SUFFIXES)]
    return checkpoint.get(keys)


def load_compressed_tensors(folder: str | Path) -> nn.Module:
    """Build the model of a compressed-tensors folder with its compressed Linears packed, in eval mode.

    Raises FormatError subclasses naming the file (and the layer) for anything that cannot run exactly.
    """
    from transformers import AutoConfig

    from ...attention import use_native_attention
    from ...fusion import fuse_activations
    from ...runtime import use_native_blocks
    from ...sources import model_class_for
    from ..hf.quantizer import strip_quantization_

    folder = Path(folder)
    read_config(folder)
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers' parser raises many types on damaged input
        raise FormatError(folder / "config.json", f"unreadable config: {exc}") from None
    strip_quantization_(config)
    try:
        cls = model_class_for(folder, config)
    except KeyError:
        raise FormatError(folder / "config.json", f"no transformers model for model_type {config.model_type!r}") from None
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        model = cls(config)  # dense Linear weights are allocated, never touched, then replaced
    consumed = install_layers_(model, folder)
    tensors = dense_tensors(folder, consumed)
    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise TensorLayoutError(folder, f"tensors that {cls.__name__} does not have: {unexpected[:5]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise TensorLayoutError(folder, f"tensor '{key}' is {list(tensor.shape)}, the config gives {list(expected[key].shape)}")
    model.load_state_dict(tensors, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = sorted(set(expected) - set(tensors) - tied)
    if missing:
        raise TensorLayoutError(folder, f"tensors missing for {cls.__name__}: {missing[:5]}")
    model.eval()
    model.sparsepress_folder = folder  # type: ignore[attr-defined]
    fuse_activations(model)
    use_native_attention(model)
    use_native_blocks(model)  # the native whole-stack path, as for our own folders
    return model
