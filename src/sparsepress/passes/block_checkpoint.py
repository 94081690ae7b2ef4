"""The layer solve's entries in a run's checkpoint: each finished block's packed layers, and the
hidden states feeding the next block (only the newest are kept).

Entry `block-NNNN` holds `block-NNNN.safetensors` (packed tensors and biases of the block's layers)
and `hidden-NNNN.safetensors` (the compressed model's hidden states after the block, the dense
model's when the solve follows it, and the torch RNG state); `block-NNNN.json` commits both.

Example:
    >>> import tempfile, torch
    >>> from sparsepress.checkpoint import Checkpoint
    >>> from sparsepress.nn import SparseLinear
    >>> ckpt = Checkpoint(tempfile.mkdtemp() + "/.c", weights="w")
    >>> ckpt.folder.mkdir()
    >>> layer = SparseLinear.from_linear(torch.nn.Linear(4, 2), format="dense")
    >>> BlockCheckpoint(ckpt).save_block(0, {"fc": layer}, {"fc": {"block": 0}}, [torch.ones(1, 4)])
    >>> ckpt.resume = True
    >>> finished = BlockCheckpoint(ckpt).load_finished()
    >>> finished.count, sorted(finished.layers), finished.hidden[0].shape
    (1, ['fc'], torch.Size([1, 4]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import Checkpoint
from ..errors import FormatError
from ..formats import LAYOUTS, LayoutMismatch
from ..nn import SparseLinear
from ..nn.elastic import linear_module


@dataclass
class FinishedBlocks:
    """What a checkpoint restores: the first `count` blocks' layers, and what feeds block `count`."""

    count: int
    layers: dict[str, tuple[SparseLinear, dict[str, Any]]]  # name -> (module, compression record entry)
    hidden: list[torch.Tensor] | None
    rng_state: torch.Tensor | None
    folder: Path | None = None
    dense_hidden: list[torch.Tensor] | None = None  # the dense model's, when the solve follows it


def _names(index: int, prefix: str = "") -> tuple[str, str, str]:
    stem = f"{index:04d}"
    return f"{prefix}block-{stem}", f"{prefix}block-{stem}.safetensors", f"{prefix}hidden-{stem}.safetensors"


class BlockCheckpoint:
    """Saves and restores finished blocks of the layer solve in a run's `Checkpoint`.

    `prefix` keeps the entries of two solves of one run apart (a prune solve before distillation and
    the quantize solve after it).
    """

    def __init__(self, checkpoint: Checkpoint, prefix: str = ""):
        self.checkpoint = checkpoint
        self.prefix = prefix

    def _names(self, index: int) -> tuple[str, str, str]:
        return _names(index, self.prefix)

    def save_block(self, index: int, layers: dict[str, SparseLinear], records: dict[str, dict[str, Any]],
                   hidden: list[torch.Tensor] | None, dense_hidden: list[torch.Tensor] | None = None) -> None:
        """Commit block `index`: its packed layers, their record entries, and the hidden states after it
        (the compressed model's, and the dense model's when the solve aims at it)."""
        stem, layers_file, hidden_file = self._names(index)
        tensors: dict[str, torch.Tensor] = {}
        entries: dict[str, Any] = {}
        for name, layer in layers.items():
            own = dict(layer.packed.tensors())
            if layer.bias is not None:
                own["bias"] = layer.bias
            tensors.update({f"{name}.{suffix}": t for suffix, t in own.items()})
            entries[name] = {"packed": layer.packed.meta(), "tensors": sorted(own), "record": records[name]}
        extra: dict[str, torch.Tensor] = {"rng_state": torch.get_rng_state()}
        for prefix, states in (("hidden", hidden), ("dense", dense_hidden)):
            extra.update({f"{prefix}.{j}": h for j, h in enumerate(states or [])})
        body = {"index": index, "layers": entries,
                "hidden_count": len(hidden) if hidden is not None else None,
                "dense_count": len(dense_hidden) if dense_hidden is not None else None}
        self.checkpoint.save_entry(stem, {layers_file: tensors, hidden_file: extra}, body)
        if index > 0:
            self.checkpoint.remove(self._names(index - 1)[2])  # only the newest hidden states are ever needed

    def load_finished(self) -> FinishedBlocks | None:
        """The committed blocks 0..k-1 of a resumed run (None when there are none or not resuming)."""
        count = 0
        while self.checkpoint.has_entry(self._names(count)[0]):
            count += 1
        if count == 0:
            return None
        layers: dict[str, tuple[SparseLinear, dict[str, Any]]] = {}
        for index in range(count):
            layers.update(self._read_layers(index))
        hidden, dense_hidden, rng_state = self._read_hidden(count - 1)
        return FinishedBlocks(count=count, layers=layers, hidden=hidden, rng_state=rng_state,
                              folder=self.checkpoint.folder, dense_hidden=dense_hidden)

    def _read_layers(self, index: int) -> dict[str, tuple[SparseLinear, dict[str, Any]]]:
        stem, layers_file, _ = self._names(index)
        body, files = self.checkpoint.load_entry(stem, [layers_file])
        tensors = files[layers_file]
        layers = {}
        for name, entry in dict(body.get("layers") or {}).items():
            try:
                own = {suffix: tensors[f"{name}.{suffix}"] for suffix in entry["tensors"]}
                bias = own.pop("bias", None)
                packed = LAYOUTS[entry["packed"]["format"]].from_tensors(own, entry["packed"])
                layers[name] = (linear_module(packed, bias), dict(entry["record"]))
            except (KeyError, TypeError, ValueError, LayoutMismatch) as exc:
                raise FormatError(self.checkpoint.folder / layers_file,
                                  f"layer '{name}' cannot be restored: {exc}; rerun without --resume") from None
        return layers

    def _read_hidden(self, index: int) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None, torch.Tensor | None]:
        stem, _, hidden_file = self._names(index)
        body, files = self.checkpoint.load_entry(stem, [hidden_file])
        tensors = files[hidden_file]
        try:
            hidden, dense = (None if body.get(key) is None else [tensors[f"{prefix}.{j}"] for j in range(int(body[key]))]
                             for key, prefix in (("hidden_count", "hidden"), ("dense_count", "dense")))
        except (KeyError, TypeError, ValueError):
            raise FormatError(self.checkpoint.folder / hidden_file, "hidden states missing; rerun without --resume") from None
        return hidden, dense, tensors.get("rng_state")
