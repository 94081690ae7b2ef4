"""Finished blocks written to disk as soon as they are solved, so a streamed compression's memory does
not grow with the blocks it has done.

`BlockSpill.beside(out)` makes a hidden folder `.NAME.spill-XXXX/` next to the output folder (the same
file system, so the final copy is local) and removes it when the `with` block ends, however it ends.
`sp.compress(..., spill=spill)` writes block i's packed layers to `block-000i.safetensors` there once
the block is solved (after its checkpoint, when the run has one), and puts a `SpilledLinear` holding no
tensor where each of them was; `sp.save(model, out)` inside the same `with` block copies them into the
folder's tensors file (the same bytes the in-memory path writes) and renames the folder into place. A
failure or an interruption anywhere leaves no output folder and, once the `with` block is left, no
spill folder.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from pathlib import Path
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from sparsepress.stream import open_streamed
    >>> root = Path(tempfile.mkdtemp())
    >>> LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(root / "src")
    >>> model, weights = open_streamed(root / "src")
    >>> recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}
    >>> with BlockSpill.beside(root / "out") as spill:
    ...     model = sp.compress(model, recipe, calibration=[torch.randint(0, 100, (8,))], weights=weights, spill=spill)
    ...     kind = type(model.model.layers[0].mlp.up_proj).__name__
    ...     _ = sp.save(model, root / "out")
    >>> kind, sorted(p.name for p in root.iterdir())
    ('SpilledLinear', ['out', 'src'])
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .io import layer_entry
from .memory import trim_heap
from .models import replace_module
from .nn import SparseLinear
from .nn.spilled import SpilledLinear
from .tensorfile import read_index


class BlockSpill:
    """Writes finished blocks' packed layers into `folder` (which must exist) and leaves placeholders.

    Example:
        >>> import tempfile
        >>> model = nn.Sequential(SparseLinear.from_linear(nn.Linear(4, 2), format="dense"))
        >>> BlockSpill(Path(tempfile.mkdtemp())).spill_(model, 0, ["0"])
        >>> type(model[0]).__name__, model[0].nbytes
        ('SpilledLinear', 40)
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    @contextmanager
    def beside(cls, out: str | Path) -> Iterator[BlockSpill]:
        """A spill folder next to the output folder `out`, removed when the block ends (see the module example)."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.spill-", dir=out.parent))
        try:
            yield cls(folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def spill_(self, model: nn.Module, index: int, names: list[str]) -> None:
        """Write the packed layers `names` of `model` (block `index`) to one file and replace each by a
        `SpilledLinear`; layers that are not packed (SparseLinear) stay as they are."""
        layers = {name: module for name in names if isinstance(module := model.get_submodule(name), SparseLinear)}
        if not layers:
            return
        entries = {name: layer_entry(name, layer) for name, layer in layers.items()}
        tensors = {key: tensor.detach().contiguous().cpu() for own, _ in entries.values() for key, tensor in own.items()}
        nonfinite = tuple(key for key, tensor in tensors.items()
                          if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))
        path = self.folder / f"block-{index:04d}.safetensors"
        save_file(tensors, str(path), metadata={"format": "pt"})
        stored = read_index(path)
        del tensors
        for name, (own, entry) in entries.items():
            replace_module(model, name, SpilledLinear(name, entry, {key: stored[key] for key in own},
                                                      tuple(key for key in nonfinite if key in own)))
        del entries, layers
        trim_heap()  # the packed tensors' pages go back to the system now, not at the end of the run
