"""One safetensors file written from tensors in memory and tensors already on disk, byte for byte
what `safetensors.torch.save_file` writes for the same tensors.

A streamed compression writes each finished block's packed tensors to a file of its own and drops
them from memory (`sparsepress.spill`); the model folder's single tensors file is then assembled here:
the header is laid out as safetensors lays it out (tensors sorted by dtype, widest first, then by
name; compact JSON with `__metadata__` first, padded with spaces to 8 bytes), the in-memory tensors
are written from memory and the stored ones copied from their files in chunks, so the assembly holds
no more than one chunk of them. Because the bytes are the same, the manifest's sha256 of a streamed
folder equals the in-memory path's.

Example:
    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> from safetensors.torch import load_file, save_file
    >>> folder = Path(tempfile.mkdtemp())
    >>> save_file({"a": torch.arange(3.0)}, str(folder / "part.safetensors"))
    >>> stored = read_index(folder / "part.safetensors")["a"]
    >>> write_tensor_file(folder / "all.safetensors", {"a": stored, "b": torch.ones(2, dtype=torch.int8)})
    >>> sorted(load_file(folder / "all.safetensors"))
    ['a', 'b']
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .errors import FormatError, InputError

# safetensors' dtype names, in the order of its Rust `Dtype` enum: the data section is sorted by it,
# descending (widest alignment first), then by tensor name.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
    torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.uint64: "U64",
}
DTYPE_RANK = {name: rank for rank, name in enumerate(DTYPE_NAMES.values())}
COPY_CHUNK = 1 << 24  # bytes of a stored tensor held at once while it is copied


@dataclass(frozen=True)
class StoredTensor:
    """A tensor's bytes inside a safetensors file: `start`, `end` are absolute file offsets.

    Example:
        >>> StoredTensor(Path("x.safetensors"), "F32", (2,), 16, 24).nbytes
        8
    """

    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_index(path: Path) -> dict[str, StoredTensor]:
    """Where each tensor of a safetensors file lies (its header only is read); FormatError naming the file.

    Example:
        >>> import tempfile; from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"; save_file({"w": torch.zeros(2)}, str(path))
        >>> read_index(path)["w"].shape
        (2,)
    """
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        base = 8 + length
        return {name: StoredTensor(path, info["dtype"], tuple(int(d) for d in info["shape"]),
                                   base + int(info["data_offsets"][0]), base + int(info["data_offsets"][1]))
                for name, info in header.items() if name != "__metadata__"}
    except (OSError, struct.error, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError,
            IndexError, AttributeError) as exc:
        raise FormatError(path, f"unreadable safetensors header: {exc}") from None


def check_stored(tensors: Mapping[str, StoredTensor]) -> None:
    """InputError naming the first file that is gone or shorter than a stored tensor needs (a spill
    folder removed before the model was saved).

    Example:
        >>> check_stored({"w": StoredTensor(Path("/nonexistent/b.safetensors"), "F32", (1,), 8, 12)})
        Traceback (most recent call last):
        ...
        sparsepress.errors.InputError: /nonexistent/b.safetensors: tensor 'w' was written here and the file is gone or cut short; save the model before its spill folder is removed
    """
    for key, tensor in tensors.items():
        try:
            size = tensor.path.stat().st_size
        except OSError:
            size = -1
        if size < tensor.end:
            raise InputError(tensor.path, f"tensor {key!r} was written here and the file is gone or cut short; "
                                          "save the model before its spill folder is removed")


def _describe(tensor: torch.Tensor | StoredTensor) -> tuple[str, tuple[int, ...], int]:
    if isinstance(tensor, StoredTensor):
        return tensor.dtype, tensor.shape, tensor.nbytes
    return DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), tensor.numel() * tensor.element_size()


def layout(tensors: Mapping[str, torch.Tensor | StoredTensor],
           metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[str]]:
    """The header bytes (length prefix included) and the order the tensors' data follows it in.

    Example:
        >>> header, order = layout({"b": torch.zeros(1), "a": torch.zeros(1, dtype=torch.int8)})
        >>> order
        ['b', 'a']
    """
    order = sorted(tensors, key=lambda name: (-DTYPE_RANK[_describe(tensors[name])[0]], name))
    entries: dict[str, object] = {}
    if metadata is not None:
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for name in order:
        dtype, shape, nbytes = _describe(tensors[name])
        entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def _copy_range(source: StoredTensor, handle: BinaryIO) -> None:
    with open(source.path, "rb") as src:
        src.seek(source.start)
        left = source.nbytes
        while left:
            chunk = src.read(min(COPY_CHUNK, left))
            if not chunk:
                raise FormatError(source.path, "shorter than its safetensors header says")
            handle.write(chunk)
            left -= len(chunk)


def write_tensor_file(path: Path, tensors: Mapping[str, torch.Tensor | StoredTensor],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write `tensors` (CPU tensors, or `StoredTensor` ranges of other files) as one safetensors file at
    `path`, with the bytes `safetensors.torch.save_file` gives for the same tensors. See the module example."""
    header, order = layout(tensors, metadata)
    with open(path, "wb") as handle:
        handle.write(header)
        for name in order:
            tensor = tensors[name]
            if isinstance(tensor, StoredTensor):
                _copy_range(tensor, handle)
            elif tensor.numel():
                data = tensor.detach().contiguous().cpu().reshape(-1)
                handle.write(memoryview(data.view(torch.uint8).numpy()))


__all__ = ["StoredTensor", "check_stored", "layout", "read_index", "write_tensor_file"]
