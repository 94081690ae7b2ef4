"""Structured removal of a whole model for one or more recipe stages (`pattern: channel | head | layer`).

Channel and head stages score every block's units (`scores.SCORES`) on calibration data, keep the
most important ones per block (`allocate.kept_units`) and cut them out (`surgery.remove_units_`);
with `method: sparsegpt` the consumer projection (FFN down, attention output) is then refitted by
least squares so the kept units absorb the removed ones' contribution (SlimGPT / FLAP-style). Layer
stages keep the blocks `layers.kept_blocks` chooses. Afterwards the config is rewritten
(`shapes.rewrite_config_`), and `StructuredRecord` says what changed (the folder's manifest keeps it).

Everything is decided before the model is touched; a model the surgery does not support raises
UnsupportedModelError naming what, and is left as it was.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertModel
    >>> from sparsepress.calibration import make_batches
    >>> from sparsepress.recipe import PruneStage
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    ...                              intermediate_size=48, vocab_size=64)).eval()
    >>> batches = make_batches([torch.randint(0, 64, (8,)) for _ in range(4)], 2, 0)
    >>> record = remove_structure_(model, [PruneStage(method="wanda", pattern="channel", sparsity=0.5)], batches)
    >>> model.config.intermediate_size, record.plain_config, record.parameters_after < record.parameters_before
    (24, True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..models.anatomy import BlockAnatomy, block_anatomies, check_family, model_type
from ..recipe import PruneStage
from .allocate import kept_units, removed_count
from .layers import kept_blocks
from .scores import SCORES
from .shapes import rewrite_config_
from .stats import collect_unit_stats
from .surgery import remove_blocks_, remove_units_
from .units import UNIT_MAKERS

# Methods that refit the consumer projection after removal (needs its input Hessian).
REFIT_METHODS = ("sparsegpt",)


@dataclass
class StructuredRecord:
    """What structured removal did, kept in the folder's manifest under `structured` (`to_json`)."""

    steps: list[dict[str, Any]]
    source_blocks: int
    blocks: list[BlockAnatomy]
    source_index: list[int]
    plain_config: bool
    reason: str | None
    parameters_before: int
    parameters_after: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The manifest entry: per-block anatomies (with `source_index`), whether config.json alone
        builds this model in plain transformers (`plain_config`) and if not why (`reason`)."""
        return {
            "steps": self.steps,
            "source_blocks": self.source_blocks,
            "blocks": [{**a.to_json(), "source_index": i} for a, i in zip(self.blocks, self.source_index)],
            "plain_config": self.plain_config,
            "reason": self.reason,
            "parameters": {"before": self.parameters_before, "after": self.parameters_after},
        }


def block_parameters(model: nn.Module) -> int:
    """Parameters outside the embedding tables (what structured removal shrinks).

    Example:
        >>> block_parameters(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
        10
    """
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def _check_heads_local(model: nn.Module, anatomies: list[BlockAnatomy]) -> None:
    """Head removal needs every per-head parameter inside the blocks; a table shared across blocks with
    one entry per head (MPNet's relative position bias) would no longer fit a block with fewer heads."""
    heads = anatomies[0].heads
    block_names = tuple(f"{a.block}." for a in anatomies)
    for name, param in model.named_parameters():
        if not name.startswith(block_names) and param.dim() == 2 and param.shape[1] == heads and heads != param.shape[0]:
            owner = name.rpartition(".")[0]
            raise UnsupportedModelError(model_type(model), "structured pattern 'head'",
                                        f"{owner} holds one entry per head shared by every block")


def _rename(anatomy: BlockAnatomy, index: int, block: str) -> BlockAnatomy:
    old = anatomy.block

    def move(name: str | None) -> str | None:
        return None if name is None else block + name[len(old):]

    return dataclasses.replace(
        anatomy, index=index, block=block, q=move(anatomy.q), kv=tuple(move(n) for n in anatomy.kv),  # type: ignore[misc]
        fused=move(anatomy.fused), o=move(anatomy.o), ffn_in=tuple(move(n) for n in anatomy.ffn_in),  # type: ignore[misc]
        ffn_out=move(anatomy.ffn_out), attention=move(anatomy.attention), ffn=move(anatomy.ffn))  # type: ignore[arg-type]


Progress = Callable[[str, int, int], None]


def _remove_units(model: nn.Module, stage: PruneStage, anatomies: list[BlockAnatomy],
                  batches: list[dict[str, torch.Tensor]], seed: int, progress: Progress | None) -> tuple[list[BlockAnatomy], dict[str, Any]]:
    pattern = stage.parsed_pattern.kind
    score_name = stage.structured_score
    if pattern == "head":
        _check_heads_local(model, anatomies)
    units = [UNIT_MAKERS[pattern](a) for a in anatomies]
    refit = stage.method in REFIT_METHODS
    stats = None
    if score_name != "magnitude" or refit:
        stats = collect_unit_stats(model, anatomies, batches, taylor=score_name == "taylor", hessians=refit, seed=seed)
    scorer = SCORES[score_name]
    columns = [None if stats is None else (s.ffn if pattern == "channel" else s.heads) for s in (stats or [None] * len(units))]
    scores = [scorer(model, u, c) for u, c in zip(units, columns)]
    keep = kept_units(scores, float(stage.sparsity), stage.allocation)  # type: ignore[arg-type]
    after = []
    for index, (anatomy, block_units, kept, column) in enumerate(zip(anatomies, units, keep, columns)):
        hessian = column.hessian if (refit and column is not None) else None
        after.append(remove_units_(model, anatomy, block_units, kept, refit=hessian, dampening=stage.dampening))
        if progress is not None:
            progress(f"removing {pattern}s", index + 1, len(anatomies))
    step = {"pattern": pattern, "sparsity": stage.sparsity, "score": score_name, "allocation": stage.allocation,
            "refit": refit, "kept": [len(k) for k in keep], "units": [u.count for u in units]}
    return after, step


def remove_structure_(model: nn.Module, stages: list[PruneStage], batches: list[dict[str, torch.Tensor]], *,
                      seed: int = 0, progress: Progress | None = None) -> StructuredRecord:
    """Apply the structured prune `stages` to `model` in place, in recipe order (see the module example)."""
    check_family(model, "structured pattern " + ", ".join(repr(s.pattern) for s in stages))
    if any(s.parsed_pattern.kind == "layer" for s in stages) and getattr(model.config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedModelError(model_type(model), "structured pattern 'layer'",
                                    "scale_attn_by_inverse_layer_idx ties each block's attention scale to its position")
    anatomies = block_anatomies(model)
    before = block_parameters(model)
    source_blocks = len(anatomies)
    source_index = list(range(source_blocks))
    steps = []
    for stage in stages:
        kind = stage.parsed_pattern.kind
        if kind == "layer":
            remove = removed_count(len(anatomies), float(stage.sparsity))  # type: ignore[arg-type]
            keep = kept_blocks(model, batches, remove, stage.structured_score)
            remove_blocks_(model, keep)
            prefix = anatomies[0].block.rpartition(".")[0]
            anatomies = [_rename(anatomies[k], i, f"{prefix}.{i}") for i, k in enumerate(keep)]
            steps.append({"pattern": "layer", "sparsity": stage.sparsity, "score": stage.structured_score,
                          "removed": [source_index[i] for i in range(len(source_index)) if i not in keep]})
            source_index = [source_index[k] for k in keep]
        else:
            anatomies, step = _remove_units(model, stage, anatomies, batches, seed, progress)
            steps.append(step)
    plain, reason = rewrite_config_(model, anatomies, source_index)
    return StructuredRecord(steps, source_blocks, anatomies, source_index, plain, reason, before, block_parameters(model))
