"""`AutoModel*.from_pretrained(DIR)` on sparsepress folders: a quantizer in transformers' registry.

`sp.save` stamps `config.json` with `"quantization_config": {"quant_method": "sparsepress", ...}`. After
`import sparsepress`, transformers finds this quantizer for it: the quantizer points the loader at
`sparsepress.safetensors`, puts `SparseLinear` / `QuantizedEmbedding` modules (built from the packed
tensors, checksum verified) where the model has packed layers before the weights load, lets transformers
load every dense tensor itself, and afterwards fuses activations and switches to the native attention as
`sp.load` does. Pipelines, `generate()` and sentence-transformers then run on the packed kernels.
A compressed-tensors folder can be routed here too (`source_format: compressed-tensors`, which
`sp.load_sentence_transformer` passes as a config override): its layers are read onto our formats.

Without sparsepress imported, transformers finds no `model.safetensors` in such a folder and refuses
to load it (it never silently builds a random model).

Example:
    >>> SparsepressConfig(source_format="compressed-tensors").source_format
    'compressed-tensors'
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ...errors import FormatError

QUANT_METHOD = "sparsepress"
SOURCE_FORMATS = ("sparsepress", "compressed-tensors")
FORMAT_VERSION = 1


def quantization_entry(source_format: str = "sparsepress") -> dict[str, Any]:
    """The `quantization_config` that routes a folder to this quantizer.

    Example:
        >>> quantization_entry()["quant_method"]
        'sparsepress'
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"unknown source format {source_format!r}; allowed: {' | '.join(SOURCE_FORMATS)}")
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "source_format": source_format}


def stamp_config_(path: Path) -> None:
    """Add the sparsepress `quantization_config` to a written `config.json`, in transformers' own layout.

    Example:
        >>> import tempfile; p = Path(tempfile.mkdtemp()) / "config.json"; _ = p.write_text("{}")
        >>> stamp_config_(p); json.loads(p.read_text())["quantization_config"]["source_format"]
        'sparsepress'
    """
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"] = quantization_entry()
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def strip_quantization_(config: Any) -> None:
    """Drop the quantization markers from a loaded transformers config (ours or compressed-tensors'),
    so that a model built from it saves and exports as a plain model.

    Example:
        >>> from transformers import BertConfig
        >>> c = BertConfig(quantization_config=quantization_entry()); strip_quantization_(c)
        >>> hasattr(c, "quantization_config")
        False
    """
    for name in ("quantization_config", "transformers_weights"):
        if name in config.__dict__:
            delattr(config, name)


class SparsepressConfig(QuantizationConfigMixin):
    """The `quantization_config` of a sparsepress folder (or of a folder routed to sparsepress)."""

    def __init__(self, format_version: int = FORMAT_VERSION, source_format: str = "sparsepress", **kwargs: Any):
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]
        self.format_version = format_version
        self.source_format = source_format
        if source_format not in SOURCE_FORMATS:
            raise ValueError(f"sparsepress quantization_config: unknown source_format {source_format!r}; "
                             f"allowed: {' | '.join(SOURCE_FORMATS)}")
        if not isinstance(format_version, int) or format_version > FORMAT_VERSION:
            raise ValueError(f"sparsepress quantization_config: format_version {format_version!r} is newer than "
                             f"this sparsepress reads ({FORMAT_VERSION}); upgrade sparsepress")


class SparsepressHfQuantizer(HfQuantizer):
    """Loads packed layers into the model transformers builds; dense tensors load the usual way."""

    # Nothing is quantized on the fly; a config passed to from_pretrained (a folder saved before the
    # stamp existed) is accepted and loads the same packed tensors.
    requires_calibration = False

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.float32  # the packed kernels take float32 activations

    def update_attn_implementation(self, config: Any) -> Any:
        # The one hook that sees the model config before the weights files are looked up: point the
        # loader at our tensors file (a compressed-tensors folder keeps its own model*.safetensors).
        if self.quantization_config.source_format == "sparsepress":
            from ...io import TENSORS

            config.transformers_weights = TENSORS
        return config

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> nn.Module:
        if not checkpoint_files:
            raise FormatError("from_pretrained", "sparsepress folders load from a local folder only")
        folder = Path(checkpoint_files[0]).parent
        from ...models import convert_conv1d_

        with torch.device("meta"):
            convert_conv1d_(model)  # our folders store GPT-2 Conv1D weights as Linear
        with torch.device("cpu"):
            if self.quantization_config.source_format == "sparsepress":
                packed_keys = _install_sparsepress_(model, folder)
            else:
                from ..compressed_tensors.read import install_layers_

                packed_keys = install_layers_(model, folder)
        ignore = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        model._keys_to_ignore_on_load_unexpected = ignore | {re.escape(key) + "$" for key in packed_keys}
        model.sparsepress_folder = folder  # type: ignore[assignment]
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        from ...attention import use_native_attention
        from ...fusion import fuse_activations
        from ...runtime import use_native_blocks

        model.eval()
        fuse_activations(model)
        use_native_attention(model)
        use_native_blocks(model)  # the same native whole-stack path sp.load installs
        return model

    def is_serializable(self) -> bool:
        return False  # sp.save writes our folders; save_pretrained would write the wrong tensors

    @property
    def is_trainable(self) -> bool:
        return False


def _install_sparsepress_(model: nn.Module, folder: Path) -> list[str]:
    """Put the folder's packed layers and embeddings into `model`; the tensor keys they consumed."""
    from ...io import TENSORS, _install_activation_levels, _install_embedding, _install_linear, read_manifest

    manifest = read_manifest(folder)
    prefixes = tuple(f"{name}." for name in (*manifest["layers"], *manifest["embeddings"]))
    with safe_open(str(folder / TENSORS), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefixes)}
    consumed = sorted(tensors)
    for name, meta in manifest["layers"].items():
        _install_linear(folder, model, tensors, name, meta)
    _install_activation_levels(folder, model, manifest.get("activation_sparsity"))
    for name, meta in manifest["embeddings"].items():
        _install_embedding(folder, model, tensors, name, meta)
    model.sparsepress_manifest = manifest  # type: ignore[assignment]
    return consumed


def register() -> None:
    """Register the config class and the quantizer with transformers (idempotent).

    Example:
        >>> register(); from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
        >>> AUTO_QUANTIZER_MAPPING["sparsepress"].__name__
        'SparsepressHfQuantizer'
    """
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SparsepressConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SparsepressHfQuantizer)
