"""What the passes of one compression run share: the model, the recipe, calibration data made once,
progress reporting, the non-finite policy, the checkpoint, and the record that `sp.save` writes.

Example:
    >>> import torch
    >>> from sparsepress.recipe import Recipe
    >>> recipe = Recipe.model_validate({"stages": [{"quantize": {"method": "rtn"}}]})
    >>> ctx = CompressionContext(torch.nn.Linear(2, 2), recipe, calibration=[torch.tensor([1, 2, 3])])
    >>> [b["input_ids"].tolist() for b in ctx.batches]
    [[[1, 2, 3]]]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn

from ..calibration import make_batches, to_token_ids
from ..models import ModelLayout, find_layout
from ..recipe import Recipe
from .selection import LayerSelection, check_weights_finite, select_layers

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class LayerTarget:
    """What the layer solve makes of one Linear; None / empty fields mean "as the recipe says".

    `sparsity`: the layer's target; `levels`: nested elastic sparsities (two or more, increasing) instead
    of one; `pattern`, `bits`, `format`: per-layer overrides of the prune pattern, the quantization bits
    and the packed format (what a budget's allocation chooses); with `bits` set, `group_size` is the
    scale group of those bits (None: one scale per row).

    Example:
        >>> LayerTarget(levels=(0.5, 0.7)).elastic, LayerTarget(sparsity=0.5).elastic
        (True, False)
    """

    sparsity: float | None = None
    levels: tuple[float, ...] = ()
    pattern: str | None = None
    bits: int | None = None
    group_size: int | None = None
    format: str | None = None

    @property
    def elastic(self) -> bool:
        return len(self.levels) > 1


@dataclass
class CompressionRecord:
    """What a compression did, kept on the model (`model.sparsepress_record`) for save and inspect.

    `layers` / `embeddings`: per-module entries that land in the folder's manifest; `extra`: entries
    of model-level passes (by pass name) that land there too.

    Example:
        >>> from sparsepress.recipe import Recipe
        >>> CompressionRecord(Recipe.model_validate({"stages": [{"quantize": {}}]})).adapter
        'generic'
    """

    recipe: Recipe
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    embeddings: dict[str, dict[str, Any]] = field(default_factory=dict)
    adapter: str = "generic"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompressionContext:
    """The state one `sp.compress` run hands from pass to pass (see the module example).

    Calibration token ids and batches are made on first use, so data-free recipes never tokenize.
    `targets` holds each compressed layer's `LayerTarget` once an allocation pass has chosen it;
    `embedding_bits` the bits an allocation chose per embedding table (by module name); `masks` the
    keep-masks of layers pruned but not yet packed (kept fixed by distillation and the quantize solve
    after it); `teacher` a copy of the model as it was before any pass changed it, when a pass
    (distillation) asked for one; `weights` the reader of a streamed model's files (`sparsepress.stream`),
    None when the model is in memory; `spill` where finished blocks' packed layers go as soon as they are
    solved (`sparsepress.spill.BlockSpill`), None to keep them in the model.
    """

    model: nn.Module
    recipe: Recipe
    calibration: Sequence[str] | Sequence[torch.Tensor] | None = None
    tokenizer: Any = None
    samples: int = 128
    seq_len: int = 128
    batch_size: int = 8
    progress: Progress | None = None
    nonfinite: str = "error"
    checkpoint: Any = None
    weights: Any = None
    spill: Any = None
    targets: dict[str, LayerTarget] = field(default_factory=dict)
    embedding_bits: dict[str, int] = field(default_factory=dict)
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: nn.Module | None = None
    dropped: dict[str, int] = field(default_factory=dict)
    _checkpoint_open: bool = False

    def __post_init__(self) -> None:
        self.record = CompressionRecord(recipe=self.recipe, adapter=self.layout.adapter)

    @property
    def layout(self) -> ModelLayout:
        """The model's blocks and embeddings as they are now (passes may change the model)."""
        return find_layout(self.model)

    @cached_property
    def selection(self) -> LayerSelection:
        """The Linear layers the recipe compresses, chosen on first use (after any model surgery)."""
        return select_layers(self.model, self.recipe, self.nonfinite)

    @cached_property
    def token_ids(self) -> list[torch.Tensor]:
        """The calibration samples as token-id tensors (made once)."""
        return to_token_ids(self.calibration, self.tokenizer, self.samples, self.seq_len, self.recipe.seed)

    @cached_property
    def batches(self) -> list[dict[str, torch.Tensor]]:
        """The calibration samples padded into batches of `batch_size` (made once)."""
        pad_id = getattr(self.tokenizer, "pad_token_id", None) or 0
        return make_batches(self.token_ids, self.batch_size, pad_id)

    def tick(self, what: str, done: int, total: int) -> None:
        """Report progress of a long step (a no-op without a progress callback)."""
        if self.progress is not None:
            self.progress(what, done, total)

    @contextmanager
    def block_weights(self, name: str) -> Iterator[None]:
        """Block `name`'s weights for the time of its solve: a streamed model reads them from disk
        (checked finite), then lets go of the dense tensors of the layers the solve replaced; a model
        in memory has them already.

        Example:
            >>> from sparsepress.recipe import Recipe
            >>> ctx = CompressionContext(torch.nn.Linear(2, 2), Recipe.model_validate({"stages": [{"quantize": {}}]}))
            >>> with ctx.block_weights(""):
            ...     ctx.model.weight.device.type
            'cpu'
        """
        if self.weights is None:
            yield
            return
        self.weights.load_(self.model, [name])
        check_weights_finite({n: layer for n, layer in self.selection.layers.items() if n.startswith(f"{name}.")},
                             self.nonfinite)
        yield
        self.weights.release_replaced_(self.model, name)

    def open_checkpoint(self) -> Any:
        """The run's checkpoint, begun (checked or started) on the first call; None without one."""
        if self.checkpoint is not None and not self._checkpoint_open:
            self.checkpoint.begin(self.recipe, self.token_ids, {
                "samples": self.samples, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "nonfinite": self.nonfinite})
            self._checkpoint_open = True
        return self.checkpoint
