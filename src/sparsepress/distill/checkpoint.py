"""Distillation's entries in a run's checkpoint: the trainable weights and the optimizer state after
step k, committed as entry `distill-KKKKKK` (only the newest is kept), so an interrupted run resumes
at the last committed step and ends exactly where an uninterrupted one would.

Example:
    >>> import tempfile, torch
    >>> from sparsepress.checkpoint import Checkpoint
    >>> ckpt = Checkpoint(tempfile.mkdtemp() + "/.c", weights="w"); ckpt.folder.mkdir()
    >>> params = [torch.nn.Parameter(torch.ones(2))]
    >>> opt = torch.optim.AdamW(params)
    >>> params[0].grad = torch.ones(2); opt.step()
    >>> DistillCheckpoint(ckpt).save(3, params, opt)
    >>> ckpt.resume = True
    >>> fresh = [torch.nn.Parameter(torch.zeros(2))]
    >>> DistillCheckpoint(ckpt).restore(fresh, torch.optim.AdamW(fresh), total_steps=10), torch.equal(fresh[0], params[0])
    (3, True)
"""

from __future__ import annotations

import torch

from ..checkpoint import Checkpoint
from ..errors import FormatError

_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq")


class DistillCheckpoint:
    """Saves and restores distillation progress in a run's `Checkpoint` (`prefix`: one of several
    distillations of a run, e.g. gradual rounds)."""

    def __init__(self, checkpoint: Checkpoint, prefix: str = ""):
        self.checkpoint = checkpoint
        self.prefix = prefix
        self._last: int | None = None

    def _stem(self, step: int) -> str:
        return f"distill-{self.prefix}{step:06d}"

    def save(self, step: int, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        """Commit the state after `step` steps; the previous entry is dropped once this one is committed."""
        tensors = {f"param.{i}": p.detach() for i, p in enumerate(params)}
        for i, p in enumerate(params):
            state = optimizer.state.get(p, {})
            tensors.update({f"state.{i}.{key}": state[key] for key in _STATE_KEYS if key in state})
        stem = self._stem(step)
        self.checkpoint.save_entry(stem, {f"{stem}.safetensors": tensors}, {"step": step, "params": len(params)})
        if self._last is not None and self._last != step:
            old = self._stem(self._last)
            self.checkpoint.remove(f"{old}.json")
            self.checkpoint.remove(f"{old}.safetensors")
        self._last = step

    def restore(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, total_steps: int) -> int:
        """Load the newest committed state into `params` and `optimizer`; returns its step (0: none)."""
        step = next((k for k in range(total_steps, 0, -1) if self.checkpoint.has_entry(self._stem(k))), 0)
        if step == 0:
            return 0
        stem = self._stem(step)
        body, files = self.checkpoint.load_entry(stem)
        tensors = files[f"{stem}.safetensors"]
        if body.get("params") != len(params):
            raise FormatError(self.checkpoint.folder / f"{stem}.json", "distillation state does not fit this model; rerun without --resume")
        with torch.no_grad():
            for i, p in enumerate(params):
                saved = tensors.get(f"param.{i}")
                if saved is None or saved.shape != p.shape:
                    raise FormatError(self.checkpoint.folder / f"{stem}.safetensors", f"parameter {i} missing or misshapen; rerun without --resume")
                p.copy_(saved)
                state = {key: tensors[f"state.{i}.{key}"].clone() for key in _STATE_KEYS if f"state.{i}.{key}" in tensors}
                if state:
                    optimizer.state[p] = state
        self._last = step
        return step
