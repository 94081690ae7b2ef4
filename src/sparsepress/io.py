"""Model folders (DESIGN section 4): safetensors + a JSON manifest, written atomically, verified on load.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> out = tempfile.mkdtemp() + "/m"
    >>> sp.save(model, out).name
    'm'
    >>> type(sp.load(out)).__name__
    'BertModel'
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .attention import use_native_attention
from .errors import ChecksumError, FormatError, InputError, TensorLayoutError, VersionError
from .formats import LAYOUTS, LayoutMismatch
from .experts.record import experts_manifest, restore_experts_
from .fusion import fuse_activations
from .models import convert_conv1d_, replace_module
from .nn import QuantizedEmbedding, SparseLinear
from .nn.spilled import SpilledLinear
from .nn.activation import install_thresholds
from .runtime import use_native_blocks
from .tensorfile import StoredTensor, check_stored, write_tensor_file
from .nn.elastic import ElasticLinear, install_levels, linear_module, sparsity_levels

FORMAT_VERSION = 1
MANIFEST = "sparsepress.json"
TENSORS = "sparsepress.safetensors"
# Files of the source folder that travel with the model (tokenizer, sentence-transformers layout).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
    "merges.txt", "tokenizer.model", "added_tokens.json", "modules.json", "sentence_bert_config.json",
    "config_sentence_transformers.json", "generation_config.json",
)
SIDE_FOLDERS = ("1_Pooling", "2_Normalize")
# Records of model-level passes that the manifest keeps under their pass name: `structured` (the
# per-block shapes of a structurally pruned model, and whether config.json alone expresses them:
# `plain_config`), `distill` (steps and losses of the recovery fine-tuning), `activation_sparsity`
# (the calibrated activation thresholds' levels).
MANIFEST_EXTRAS = ("structured", "distill", "activation_sparsity", "budget", "sensitivity")


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks.

    Example:
        >>> import tempfile; p = tempfile.mktemp(); _ = open(p, "wb").write(b"x")
        >>> sha256_of(Path(p))[:8]
        '2d711642'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def layer_entry(name: str, module: SparseLinear) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A packed layer's tensors (by full key) and what it says of itself in the manifest (format metadata,
    bias, sparsity, nbytes; the compression record adds how it was made).

    Example:
        >>> layer = SparseLinear.from_linear(nn.Linear(8, 2), format="dense")
        >>> own, entry = layer_entry("fc", layer)
        >>> sorted(own), entry["format"], entry["bias"]
        (['fc.bias', 'fc.values'], 'dense', True)
    """
    own = {f"{name}.{suffix}": tensor for suffix, tensor in module.packed.tensors().items()}
    if module.bias is not None:
        own[f"{name}.bias"] = module.bias
    if module.act_thresholds is not None:
        own[f"{name}.act_thresholds"] = module.act_thresholds
    meta = module.packed.meta()
    meta["bias"] = module.bias is not None
    meta["sparsity"] = round(module.packed.sparsity, 6)
    meta["nbytes"] = module.nbytes
    return own, meta


def _collect_tensors(model: nn.Module) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, str]]:
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    embeddings: dict[str, Any] = {}
    history = _history(model)
    packed_prefixes = []
    # a QuantizedEmbedding reading a packed head's own integers (a tied pair) is stored once, as the head
    heads = {m.packed.values.data_ptr(): n for n, m in model.named_modules()
             if isinstance(m, SparseLinear) and m.packed.name == "dense"}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding) and module.codes.data_ptr() in heads:
            embeddings[name] = {"bits": module.bits, "shape": [module.num_embeddings, module.embedding_dim],
                                "padding_idx": module.padding_idx, "tied_to": heads[module.codes.data_ptr()]}
            packed_prefixes.append(name + ".")
        elif isinstance(module, (SparseLinear, SpilledLinear)):
            own, meta = (layer_entry(name, module) if isinstance(module, SparseLinear)
                         else (module.tensors, dict(module.entry)))
            tensors.update(own)
            extra = history["layers"].get(name, {})
            meta.update({k: extra[k] for k in ("method", "pattern", "target_sparsity", "quant_method") if k in extra})
            layers[name] = meta
            packed_prefixes.append(name + ".")
        elif isinstance(module, QuantizedEmbedding):
            tensors[f"{name}.codes"] = module.codes
            tensors[f"{name}.scales"] = module.scales
            embeddings[name] = {"bits": module.bits, "shape": [module.num_embeddings, module.embedding_dim],
                                "padding_idx": module.padding_idx}
            packed_prefixes.append(name + ".")
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for key, tensor in model.state_dict().items():
        if any(key.startswith(p) for p in packed_prefixes):
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:  # tied weights are stored once
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        tensors[key] = tensor
    return tensors, layers, embeddings, aliases


def _history(model: nn.Module) -> dict[str, Any]:
    """How the model came to be: from a fresh compression record, or the manifest it was loaded from."""
    record = getattr(model, "sparsepress_record", None)
    if record is not None:
        return {"recipe": record.recipe.to_dict(), "adapter": record.adapter, "layers": record.layers,
                "source": getattr(model, "sparsepress_source", None), "experts": record.extra.get("experts"),
                **{key: record.extra[key] for key in MANIFEST_EXTRAS if record.extra.get(key) is not None}}
    manifest = getattr(model, "sparsepress_manifest", None) or {}
    return {"recipe": manifest.get("recipe"), "adapter": manifest.get("adapter"), "layers": manifest.get("layers", {}),
            "source": manifest.get("source"), "experts": manifest.get("experts"),
            **{key: manifest[key] for key in MANIFEST_EXTRAS if manifest.get(key) is not None}}


def _atomic_folder(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(out, "exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def _replace_folder(staging: Path, out: Path) -> None:
    """Swap `staging` into `out`; the old folder survives until the new one is in place."""
    backup = None
    if out.exists():
        backup = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, backup)
    try:
        os.replace(staging, out)
    except OSError:
        if backup is not None:
            os.replace(backup, out)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def save(
    model: nn.Module,
    out: str | Path,
    tokenizer: Any = None,
    *,
    source: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` as a sparsepress folder (config, tokenizer, tensors, manifest), atomically.

    `source` (a model folder) contributes its tokenizer and sentence-transformers files. An existing
    non-empty `out` is refused unless `overwrite`; a failure leaves any old folder untouched.
    """
    out = Path(out)
    staging = _atomic_folder(out, overwrite)
    try:
        tensors, layers, embeddings, aliases = _collect_tensors(model)
        spilled = {k: v for k, v in tensors.items() if isinstance(v, StoredTensor)}
        nonfinite = {k for m in model.modules() if isinstance(m, SpilledLinear) for k in m.nonfinite}
        for key, tensor in tensors.items():
            if key in nonfinite or (key not in spilled and tensor.is_floating_point() and not torch.isfinite(tensor).all()):
                raise FormatError(out, f"refusing to save: tensor '{key}' holds NaN or Inf")
        contiguous = {k: v if k in spilled else v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}
        # One metadata key only: safetensors writes metadata in hash order, so more keys would make
        # two saves of the same model differ in bytes.
        if spilled:  # blocks a streamed compression wrote to disk: copied over, the same bytes as save_file's
            check_stored(spilled)
            write_tensor_file(staging / TENSORS, contiguous, metadata={"format": "pt"})
        else:
            save_file(contiguous, str(staging / TENSORS), metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None:
            config.save_pretrained(staging)
            from .interop.hf.quantizer import stamp_config_

            stamp_config_(staging / "config.json")  # routes AutoModel*.from_pretrained to sparsepress
        history = _history(model)
        source_path = source if source is not None else history["source"]
        for origin in (source_path, getattr(model, "sparsepress_folder", None)):
            if origin is not None:
                _copy_side_files(Path(origin), staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        manifest = {
            "format_version": FORMAT_VERSION,
            "library_version": __version__,
            "torch_version": torch.__version__.split("+")[0],
            "model_class": type(model).__name__,
            "source": str(source_path) if source_path is not None else None,
            "sentence_transformers": (staging / "modules.json").is_file(),
            "recipe": history["recipe"],
            "adapter": history["adapter"],
            "layers": layers,
            "embeddings": embeddings,
            "aliases": aliases,
            "tensors_file": TENSORS,
            "tensors_sha256": sha256_of(staging / TENSORS),
            # only for folders that have them (older manifests unchanged)
            **{key: history[key] for key in MANIFEST_EXTRAS if key in history},
        }
        if sparsity_levels(model):
            manifest["elastic"] = {"levels": sparsity_levels(model)}
        experts = experts_manifest(model, history["experts"])
        if experts is not None:  # MoE: experts stored one matrix per expert (see sparsepress.experts.record)
            manifest["experts"] = experts
        if (staging / "config.json").is_file():
            manifest["config_sha256"] = sha256_of(staging / "config.json")
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        for path in staging.iterdir():
            if path.is_file():
                _fsync(path)
        _replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _copy_side_files(source: Path, staging: Path) -> None:
    for name in SIDE_FILES:
        if (source / name).is_file() and not (staging / name).exists():
            shutil.copy2(source / name, staging / name)
    for name in SIDE_FOLDERS:
        if (source / name).is_dir() and not (staging / name).exists():
            shutil.copytree(source / name, staging / name)


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from `path`; FormatError naming the file when it is unreadable or not an object."""
    try:
        parsed = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(path, f"unreadable {what}: {exc}") from None
    if not isinstance(parsed, dict):
        raise FormatError(path, f"{what} is not a JSON object")
    return parsed


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The verified manifest of a folder: version known, tensors file present and matching its sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if _is_compressed_tensors(folder):
        from .interop.compressed_tensors.read import load_compressed_tensors

        return load_compressed_tensors(folder).sparsepress_manifest
    if folder.exists() and not folder.is_dir():
        raise InputError(folder, "not a folder; expected a sparsepress model folder")
    if not folder.is_dir():
        raise InputError(folder, "model folder not found")
    if not path.is_file():
        raise FormatError(path, "missing: not a sparsepress folder")
    manifest = _read_json_object(path, "manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise FormatError(path, f"format_version missing or not an integer: {version!r}")
    if version > FORMAT_VERSION:
        raise VersionError(path, f"format version {version} is newer than this sparsepress reads ({FORMAT_VERSION}); upgrade sparsepress")
    for key, kind in (("layers", dict), ("embeddings", dict), ("aliases", dict), ("tensors_sha256", str), ("model_class", str)):
        if not isinstance(manifest.get(key), kind):
            raise FormatError(path, f"manifest field '{key}' missing or not a {kind.__name__}")
    tensors_path = folder / TENSORS
    if not tensors_path.is_file():
        raise FormatError(tensors_path, "missing tensors file")
    if sha256_of(tensors_path) != manifest["tensors_sha256"]:
        raise ChecksumError(tensors_path, "sha256 does not match the manifest: the file is damaged or was changed")
    config_sha = manifest.get("config_sha256")
    if config_sha is not None:  # folders written before this field existed have none
        config = folder / "config.json"
        if not config.is_file():
            raise FormatError(config, "missing model config")
        if sha256_of(config) != config_sha:
            raise ChecksumError(config, "sha256 does not match the manifest: the file is damaged or was changed")
    return manifest


def _is_compressed_tensors(folder: Path) -> bool:
    from .interop.compressed_tensors.read import is_compressed_tensors_folder

    return is_compressed_tensors_folder(folder)


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / TENSORS
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(path, f"unreadable safetensors data: {exc}") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise TensorLayoutError(path, f"tensor '{key}' holds NaN or Inf")
    return tensors


def _model_class(folder: Path, manifest: dict[str, Any], config: Any) -> type[nn.Module]:
    import transformers

    if manifest.get("sentence_transformers") or (folder / "modules.json").is_file():
        try:
            return transformers.AutoModel._model_mapping[type(config)]
        except KeyError:
            raise FormatError(folder / "config.json", f"no transformers model for model_type {config.model_type!r}") from None
    name = manifest["model_class"]
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise FormatError(folder / MANIFEST, f"model_class {name!r} is not a transformers model class")
    return cls


def _check_fits_skeleton(folder: Path, cls: type[nn.Module], config: Any, manifest: dict[str, Any],
                         tensors: dict[str, torch.Tensor]) -> None:
    """Compare tensor names and shapes with the model built on the meta device (no memory), so a damaged
    config (say, a huge hidden size) is refused before anything is allocated."""
    try:
        with torch.device("meta"):
            skeleton = convert_conv1d_(cls(config))
    except Exception as exc:  # any config transformers cannot build from is a damaged folder here
        raise FormatError(folder / "config.json", f"cannot build {cls.__name__} from this config: {exc}") from None
    _apply_structure(folder, skeleton, manifest)
    if "experts" in manifest:
        restore_experts_(skeleton, manifest["experts"], folder / MANIFEST)
    where = folder / TENSORS
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    for name, meta in manifest["layers"].items():
        try:
            target = skeleton.get_submodule(name) if isinstance(name, str) and name else None
        except AttributeError:
            target = None
        if not isinstance(target, nn.Linear):
            raise TensorLayoutError(folder / MANIFEST, f"layer '{name}' is not a Linear layer of {cls.__name__}")
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if shape != [target.out_features, target.in_features]:
            raise TensorLayoutError(where, f"layer '{name}': shape {shape} does not fit the model's {[target.out_features, target.in_features]}")
    installed = tuple(f"{name}." for name in (*manifest["layers"], *manifest["embeddings"]))
    for key, tensor in tensors.items():
        if key.startswith(installed):
            continue
        if key not in shapes:
            raise TensorLayoutError(where, f"unexpected tensor '{key}' for {cls.__name__}")
        if tuple(tensor.shape) != shapes[key]:
            raise TensorLayoutError(where, f"tensor '{key}' has shape {list(tensor.shape)}, the config gives {list(shapes[key])}")


def _apply_structure(folder: Path, model: nn.Module, manifest: dict[str, Any]) -> None:
    """Give a structurally pruned model's blocks the shapes its manifest records (those a plain config
    cannot express; a no-op where config.json already built them)."""
    structured = manifest.get("structured")
    if structured is None:
        return
    from .structured import apply_block_shapes_

    try:
        apply_block_shapes_(model, structured["blocks"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise FormatError(folder / MANIFEST, f"structured block shapes unreadable: {exc}") from None


def _take(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}


def load(folder: str | Path, *, sparsity: float | None = None) -> nn.Module:
    """Rebuild the saved model (its original class, SparseLinear in place of packed layers), in eval mode.

    A folder with nested elastic levels opens at its lowest sparsity, or at `sparsity` (ValueError
    listing the stored levels when it is not one; `sp.set_sparsity` switches later).
    Raises FormatError subclasses naming the file on any damage, foreign or newer content. A
    compressed-tensors folder (llm-compressor's layout) is read onto the packed formats.
    """
    folder = Path(folder)
    if _is_compressed_tensors(folder):
        from .interop.compressed_tensors.read import load_compressed_tensors

        return load_compressed_tensors(folder)
    manifest = read_manifest(folder)
    cls, config = _config_and_class(folder, manifest)
    tensors = _read_tensors(folder)
    _check_fits_skeleton(folder, cls, config, manifest, tensors)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        model = cls(config)
    convert_conv1d_(model)
    _apply_structure(folder, model, manifest)
    if "experts" in manifest:
        restore_experts_(model, manifest["experts"], folder / MANIFEST)
    for name, meta in manifest["layers"].items():
        _install_linear(folder, model, tensors, name, meta)
    _install_activation_levels(folder, model, manifest.get("activation_sparsity"))
    _install_elastic_levels(folder, model, manifest.get("elastic"), sparsity)
    for name, meta in manifest["embeddings"].items():
        _install_embedding(folder, model, tensors, name, meta)
    for alias, original in manifest["aliases"].items():
        if original not in tensors:
            raise TensorLayoutError(folder / TENSORS, f"alias '{alias}' points at missing tensor '{original}'")
        tensors[alias] = tensors[original]
    installed = tuple(f"{name}." for name in (*manifest["layers"], *manifest["embeddings"]))
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith(installed)}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise TensorLayoutError(folder / TENSORS, f"tensors do not match {cls.__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape) or tensor.dtype != expected[key].dtype:
            raise TensorLayoutError(folder / TENSORS, f"tensor '{key}' is {tensor.dtype} {list(tensor.shape)}, expected {expected[key].dtype} {list(expected[key].shape)}")
    incompatible = model.load_state_dict(tensors, strict=False, assign=False)
    if incompatible.unexpected_keys:
        raise TensorLayoutError(folder / TENSORS, f"unexpected tensors {incompatible.unexpected_keys[:5]}")
    if hasattr(model, "tie_weights") and manifest["aliases"]:
        model.tie_weights()
    model.eval()
    model.sparsepress_manifest = manifest  # type: ignore[attr-defined]
    model.sparsepress_folder = folder  # type: ignore[attr-defined]
    fuse_activations(model)
    use_native_attention(model)
    use_native_blocks(model)
    return model


def _packed_layer(folder: Path, tensors: dict[str, torch.Tensor], name: Any,
                  meta: Any) -> tuple[Any, torch.Tensor | None, torch.Tensor | None]:
    """Pop layer `name`'s tensors and rebuild its packed weight: (packed, bias, activation thresholds);
    TensorLayoutError naming the file on any mismatch."""
    where = folder / TENSORS
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name:
        raise TensorLayoutError(folder / MANIFEST, f"layer name {name!r} is not a module path")
    if not isinstance(fmt, str) or fmt not in LAYOUTS:
        raise TensorLayoutError(folder / MANIFEST, f"layer '{name}': unknown format {fmt if isinstance(meta, dict) else meta!r}")
    own = _take(tensors, name + ".")
    bias = own.pop("bias", None)
    thresholds = own.pop("act_thresholds", None)
    if thresholds is not None and (thresholds.dtype != torch.float32 or thresholds.dim() != 1):
        raise TensorLayoutError(where, f"layer '{name}': act_thresholds must be a float32 vector")
    try:
        packed = LAYOUTS[fmt].from_tensors(own, meta)
    except LayoutMismatch as exc:
        raise TensorLayoutError(where, f"layer '{name}': {exc}") from None
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (packed.out_features,)):
        raise TensorLayoutError(where, f"layer '{name}': bias must be float32 [{packed.out_features}]")
    if bool(meta.get("bias")) != (bias is not None):
        raise TensorLayoutError(where, f"layer '{name}': bias presence does not match the manifest")
    return packed, bias, thresholds


def _embedding_parts(folder: Path, tensors: dict[str, torch.Tensor], name: Any, meta: Any) -> tuple[torch.Tensor, torch.Tensor, int, int, int, Any]:
    """Pop embedding `name`'s codes and scales and check them: (codes, scales, bits, rows, dim, padding_idx)."""
    where = folder / TENSORS
    try:
        bits, (rows, dim) = meta["bits"], meta["shape"]
        padding_idx = meta.get("padding_idx")
        if not (isinstance(name, str) and name and type(bits) is int and bits in (4, 8) and all(isinstance(v, int) and v > 0 for v in (rows, dim))
                and (padding_idx is None or isinstance(padding_idx, int))):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise TensorLayoutError(folder / MANIFEST, f"embedding '{name}': bad entry {meta!r}") from None
    own = _take(tensors, name + ".")
    if meta.get("tied_to") is not None:  # the head's tensors, checked with the head
        if not isinstance(meta["tied_to"], str) or own:
            raise TensorLayoutError(folder / MANIFEST, f"embedding '{name}': bad tied_to {meta['tied_to']!r}")
        return torch.empty(0), torch.empty(0), bits, rows, dim, padding_idx
    codes, scales = own.get("codes"), own.get("scales")
    width = dim if bits == 8 else (dim + 1) // 2
    dtype = torch.int8 if bits == 8 else torch.uint8
    if codes is None or codes.dtype != dtype or tuple(codes.shape) != (rows, width):
        raise TensorLayoutError(where, f"embedding '{name}': codes must be {dtype} [{rows}, {width}]")
    if scales is None or scales.dtype != torch.float32 or tuple(scales.shape) != (rows,):
        raise TensorLayoutError(where, f"embedding '{name}': scales must be float32 [{rows}]")
    if set(own) - {"codes", "scales"}:
        raise TensorLayoutError(where, f"embedding '{name}': unexpected tensors {sorted(set(own) - {'codes', 'scales'})}")
    return codes, scales, bits, rows, dim, padding_idx


def verify_folder(folder: str | Path) -> dict[str, Any]:
    """Check a folder without building its model: manifest, checksums, and every layer's tensors against
    its format (shape, dtype, indices); returns the manifest. Raises FormatError subclasses naming the file.

    Example:
        >>> import tempfile, torch, sparsepress as sp
        >>> out = sp.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tempfile.mkdtemp() + "/v")
        >>> sorted(verify_folder(out))[:2]
        ['adapter', 'aliases']
    """
    folder = Path(folder)
    manifest = read_manifest(folder)  # a compressed-tensors folder is fully read (and so checked) here
    if manifest.get("origin") is not None:
        return manifest
    config = folder / "config.json"
    if config.exists():
        _read_json_object(config, "config")
    tensors = _read_tensors(folder)
    if config.exists():
        # The model on the meta device (nothing allocated) gives every dense tensor's expected shape.
        _check_fits_skeleton(folder, *_config_and_class(folder, manifest), manifest, tensors)
    for name, meta in manifest["layers"].items():
        _packed_layer(folder, tensors, name, meta)
    for name, meta in manifest["embeddings"].items():
        _embedding_parts(folder, tensors, name, meta)
    for alias, original in manifest["aliases"].items():
        if not isinstance(original, str) or original not in tensors:
            raise TensorLayoutError(folder / TENSORS, f"alias '{alias}' points at missing tensor {original!r}")
    return manifest


def _config_and_class(folder: Path, manifest: dict[str, Any]) -> tuple[type[nn.Module], Any]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # transformers' config parser raises many types on damaged input
        raise FormatError(folder / "config.json", f"unreadable config: {exc}") from None
    return _model_class(folder, manifest, config), config


def _install_linear(folder: Path, model: nn.Module, tensors: dict[str, torch.Tensor], name: str, meta: Any) -> None:
    packed, bias, thresholds = _packed_layer(folder, tensors, name, meta)
    try:
        target = model.get_submodule(name)
    except AttributeError:
        raise TensorLayoutError(folder / MANIFEST, f"layer '{name}' does not exist in {type(model).__name__}") from None
    if not isinstance(target, nn.Linear) or (packed.out_features, packed.in_features) != (target.out_features, target.in_features):
        fits = [target.out_features, target.in_features] if isinstance(target, nn.Linear) else type(target).__name__
        raise TensorLayoutError(folder / TENSORS, f"layer '{name}': shape {list(packed.shape)} does not fit the model's {fits}")
    layer = linear_module(packed, bias)
    replace_module(model, name, layer)
    if thresholds is not None:
        layer.act_thresholds = thresholds


def _install_elastic_levels(folder: Path, model: nn.Module, entry: Any, sparsity: float | None) -> None:
    """Make the elastic layers follow the model's stored levels, at `sparsity` (default: the lowest)."""
    layers = [m for m in model.modules() if isinstance(m, ElasticLinear)]
    if entry is None and not layers:
        if sparsity is not None:
            raise ValueError(f"{folder} stores no elastic sparsity levels; open it without sparsity=")
        return
    try:
        levels = [float(v) for v in entry["levels"]]
        if not layers or any(len(layer.levels) != len(levels) for layer in layers):
            raise ValueError("the layers store other levels")
    except (KeyError, TypeError, ValueError) as exc:
        raise TensorLayoutError(folder / MANIFEST, f"elastic entry does not fit the stored layers: {exc}") from None
    if sparsity is not None and not any(abs(float(sparsity) - v) < 1e-9 for v in levels):
        raise ValueError(f"sparsity level {sparsity!r} is not stored in {folder}; stored levels: "
                         + ", ".join(f"{v:g}" for v in levels))
    install_levels(model, levels, active=sparsity)


def _install_activation_levels(folder: Path, model: nn.Module, entry: Any) -> None:
    """Make the layers carrying activation thresholds follow the model's stored levels, at the default one."""
    carrying = {n: m.act_thresholds for n, m in model.named_modules()
                if isinstance(m, SparseLinear) and m.act_thresholds is not None}
    if entry is None and not carrying:
        return
    try:
        levels, default = [float(v) for v in entry["levels"]], float(entry["default"])
        install_thresholds(model, carrying, levels, default)
    except (KeyError, TypeError, ValueError) as exc:
        raise TensorLayoutError(folder / MANIFEST, f"activation_sparsity entry does not fit the stored thresholds: {exc}") from None


def _install_embedding(folder: Path, model: nn.Module, tensors: dict[str, torch.Tensor], name: str, meta: Any) -> None:
    codes, scales, bits, rows, dim, padding_idx = _embedding_parts(folder, tensors, name, meta)
    try:
        target = model.get_submodule(name)
    except AttributeError:
        target = None
    if not isinstance(target, nn.Embedding) or (target.num_embeddings, target.embedding_dim) != (rows, dim):
        raise TensorLayoutError(folder / TENSORS, f"embedding '{name}': shape [{rows}, {dim}] does not fit the model")
    if meta.get("tied_to") is None:
        replace_module(model, name, QuantizedEmbedding(codes, scales, bits, dim, padding_idx))
        return
    try:
        head = model.get_submodule(meta["tied_to"])
    except AttributeError:
        head = None
    try:
        if not isinstance(head, SparseLinear) or head.packed.shape != (rows, dim) or head.packed.dtype != f"int{bits}":
            raise ValueError(f"{meta['tied_to']!r} is not a packed int{bits} [{rows}, {dim}] layer")
        replace_module(model, name, QuantizedEmbedding.from_packed(head.packed, padding_idx))
    except ValueError as exc:
        raise TensorLayoutError(folder / MANIFEST, f"embedding '{name}': tied_to: {exc}") from None
