"""The placeholder a packed layer leaves in the model once its tensors were written to disk.

A streamed compression with a spill folder (`sparsepress.spill`) writes each finished block's packed
layers to a safetensors file and puts a `SpilledLinear` where each layer was: it keeps the layer's
manifest entry and where its tensors lie, and no tensor. `sp.save` copies those tensors into the model
folder; the model itself cannot run until the folder is loaded with `sp.load`.

Example:
    >>> from pathlib import Path
    >>> from sparsepress.tensorfile import StoredTensor
    >>> layer = SpilledLinear("fc", {"format": "dense", "shape": [2, 4]},
    ...                       {"fc.values": StoredTensor(Path("b.safetensors"), "F32", (2, 4), 80, 112)})
    >>> layer.out_features, layer.in_features, layer.nbytes
    (2, 4, 32)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import InputError
from ..tensorfile import StoredTensor


class SpilledLinear(nn.Module):
    """A packed Linear whose tensors live in a spill file: `entry` is what the layer itself puts in the
    manifest (format metadata, bias, sparsity, nbytes), `tensors` its stored tensors by full key, and
    `nonfinite` the keys of those holding NaN / Inf (which `sp.save` refuses, as for a layer in memory).
    """

    def __init__(self, name: str, entry: dict[str, Any], tensors: dict[str, StoredTensor],
                 nonfinite: tuple[str, ...] = ()):
        super().__init__()
        self.name, self.entry, self.tensors, self.nonfinite = name, entry, tensors, nonfinite
        self.out_features, self.in_features = (int(d) for d in entry["shape"])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors."""
        return sum(t.nbytes for t in self.tensors.values())

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise InputError(f"<model>.{self.name}", "its packed tensors were written to disk during a streamed "
                         "compression (spill); save the model with sp.save and run the folder sp.load gives")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={self.entry.get('format')}, "
                f"file={next(iter(self.tensors.values())).path.name if self.tensors else None}")
