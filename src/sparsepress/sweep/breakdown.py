"""What a packed folder's bytes are made of, by tensor kind, read from the safetensors header (no tensor loaded).

Kinds follow what each stored tensor is for (see docs/formats.md): kept weight values, the sparsity
index that says where they sit (bitmasks, N:M indices, CSR pointers), quantization scales, biases,
quantized embedding codes, tensors left dense, the safetensors header, and the other files (config,
tokenizer, manifest). The kinds add up to the folder's size as `ls -l` counts it.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> out = sp.save(model, tempfile.mkdtemp() + "/m")
    >>> from sparsepress.report import folder_bytes
    >>> sum(size_breakdown(out).values()) == folder_bytes(out)
    True
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..io import MANIFEST, TENSORS

KINDS = (
    "weight values",
    "sparsity index",
    "quantization scales",
    "biases",
    "embedding codes",
    "dense matrices",
    "dense vectors",
    "safetensors header",
    "config, tokenizer, manifest",
)
_SUFFIX_KINDS = {
    "values": "weight values",
    "mask": "sparsity index",
    "indices": "sparsity index",
    "row_ptr": "sparsity index",
    "col_indices": "sparsity index",
    "scales": "quantization scales",
    "bias": "biases",
    "codes": "embedding codes",
}
BITS = {"fp32": 32, "bf16": 16, "fp16": 16, "int8": 8, "int4": 4}


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file: tensor name -> dtype, shape, data_offsets.

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> p = tempfile.mktemp(); save_file({"a": torch.zeros(2, 3)}, p)
        >>> read_header(p)["a"]["shape"]
        [2, 3]
    """
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def size_breakdown(folder: str | Path) -> dict[str, int]:
    """Bytes per kind (KINDS order, kinds with no bytes left out) of a packed model folder."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text())
    owners = {name: "layer" for name in manifest.get("layers", {})}
    owners.update({name: "embedding" for name in manifest.get("embeddings", {})})
    totals = dict.fromkeys(KINDS, 0)
    tensors_path = folder / TENSORS
    header = read_header(tensors_path)
    stored = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        stored += end - start
        totals[_kind(key, entry, owners)] += end - start
    totals["safetensors header"] = tensors_path.stat().st_size - stored
    others = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p != tensors_path)
    totals["config, tokenizer, manifest"] = others
    return {kind: size for kind, size in totals.items() if size}


def _kind(key: str, entry: dict[str, Any], owners: dict[str, str]) -> str:
    owner, _, suffix = key.rpartition(".")
    if owner in owners and suffix in _SUFFIX_KINDS:
        return _SUFFIX_KINDS[suffix]
    return "dense matrices" if len(entry["shape"]) >= 2 else "dense vectors"


def layer_views(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per packed layer and quantized embedding: name, sparsity, bits, format, bytes.

    Example:
        >>> layer_views({"layers": {"l": {"sparsity": 0.5, "dtype": "int8", "format": "bitmask", "nbytes": 9}},
        ...              "embeddings": {"e": {"bits": 4, "shape": [10, 4]}}})[1]["bits"]
        4
    """
    views = [
        {
            "name": name,
            "sparsity": float(meta.get("sparsity", 0.0)),
            "bits": BITS.get(meta.get("dtype"), 32),
            "format": meta.get("format", "?"),
            "bytes": int(meta.get("nbytes", 0)),
        }
        for name, meta in manifest.get("layers", {}).items()
    ]
    views += [
        {"name": name, "sparsity": 0.0, "bits": int(meta.get("bits", 32)), "format": "embedding", "bytes": 0}
        for name, meta in manifest.get("embeddings", {}).items()
    ]
    return views
