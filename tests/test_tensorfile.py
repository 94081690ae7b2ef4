"""One safetensors file assembled from tensors in memory and byte ranges of other files: the bytes
safetensors itself writes, read back unchanged."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from sparsepress.errors import FormatError, InputError
from sparsepress.tensorfile import StoredTensor, check_stored, read_index, write_tensor_file

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int16, torch.int32,
          torch.int64, torch.float64, torch.bool]


def _tensor(dtype: torch.dtype, shape: list[int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


tensor_specs = st.dictionaries(
    keys=st.from_regex(r"[a-z]{1,3}(\.[a-z0-9_]{1,6}){0,3}", fullmatch=True),
    values=st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), min_size=0, max_size=3),
                     st.integers(0, 1000), st.booleans()),
    min_size=1, max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(tensor_specs)
def test_an_assembled_file_is_the_file_safetensors_writes(specs):
    """Whichever tensors come from memory and whichever from another file, the result has save_file's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tensors = {name: _tensor(dtype, shape, seed) for name, (dtype, shape, seed, _) in specs.items()}
        on_disk = {name: t for name, t in tensors.items() if specs[name][3]}
        parts: dict[str, torch.Tensor | StoredTensor] = {n: t for n, t in tensors.items() if n not in on_disk}
        if on_disk:
            save_file(on_disk, str(folder / "part.safetensors"), metadata={"format": "pt"})
            parts.update({n: s for n, s in read_index(folder / "part.safetensors").items()})
        save_file(tensors, str(folder / "expected.safetensors"), metadata={"format": "pt"})
        write_tensor_file(folder / "got.safetensors", parts, metadata={"format": "pt"})
        assert (folder / "got.safetensors").read_bytes() == (folder / "expected.safetensors").read_bytes()
        loaded = load_file(folder / "got.safetensors")
        assert sorted(loaded) == sorted(tensors)
        for name, tensor in tensors.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name


def test_a_damaged_header_is_named(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FormatError, match="bad.safetensors: unreadable safetensors header"):
        read_index(path)


def test_a_stored_tensor_whose_file_is_gone_is_named(tmp_path):
    save_file({"w": torch.ones(4)}, str(tmp_path / "b.safetensors"))
    stored = read_index(tmp_path / "b.safetensors")
    check_stored(stored)
    (tmp_path / "b.safetensors").unlink()
    with pytest.raises(InputError, match=r"b\.safetensors: tensor 'w' was written here and the file is gone"):
        check_stored(stored)
