"""Per-block checkpoints of a compression run, so an interrupted run resumes where it stopped.

`sparsepress compress ... --out DIR` keeps them in the sibling folder `.DIR.checkpoint/`:

    fingerprint.json          what the run depends on: sha256 of the model weights, the recipe, the
                              calibration token ids, the seed, the run settings, the sparsepress version
    block-0003.safetensors    packed tensors (and biases) of block 3's compressed layers
    hidden-0003.safetensors   the hidden states feeding block 4 and the torch RNG state (latest only)
    block-0003.json           the layers' metadata and the sha256 of both files; written last, it
                              commits the block
    <pass>-*.json / .safetensors  entries of other passes (the same commit-last rule)

Every file is written under a temporary name and renamed into place, so a crash leaves at most a
stray temporary file, never a half-written block. A run without `--resume` replaces any old
checkpoint; with `--resume` a checkpoint of another run (different fingerprint) is refused. The
CLI deletes the folder once the output folder is safely written. Nothing here unpickles.

Example:
    >>> import tempfile, torch, sparsepress as sp
    >>> from transformers import BertConfig, BertModel
    >>> model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=64, vocab_size=100)).eval()
    >>> ckpt = Checkpoint(tempfile.mkdtemp() + "/.out.checkpoint", weights=weights_digest(model))
    >>> recipe = {"stages": [{"prune": {"method": "magnitude", "sparsity": 0.5}}]}
    >>> ids = [torch.randint(0, 100, (8,)) for _ in range(2)]
    >>> _ = sp.compress(model, recipe, calibration=ids, checkpoint=ckpt)
    >>> sorted(p.name for p in ckpt.folder.glob("block-*.json"))
    ['block-0000.json', 'block-0001.json']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FormatError, InputError

CHECKPOINT_VERSION = 1
FINGERPRINT = "fingerprint.json"


def checkpoint_folder(out: str | Path) -> Path:
    """The checkpoint folder of an output folder: `.NAME.checkpoint` beside it.

    Example:
        >>> checkpoint_folder("runs/small").as_posix()
        'runs/.small.checkpoint'
    """
    out = Path(out)
    return out.parent / f".{out.name}.checkpoint"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_digest(source: str | Path | nn.Module) -> str:
    """sha256 identifying a model's weights: of its safetensors file(s) for a folder, else of its state_dict.

    Example:
        >>> weights_digest(torch.nn.Linear(2, 2)) == weights_digest(torch.nn.Linear(2, 2))
        False
    """
    digest = hashlib.sha256()
    if isinstance(source, nn.Module):
        for key, tensor in source.state_dict().items():
            data = tensor.detach().cpu().contiguous()
            digest.update(f"{key}:{data.dtype}:{list(data.shape)}\n".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        return digest.hexdigest()
    folder = Path(source)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else [folder]
    if not files:
        raise InputError(folder, "no safetensors weights to fingerprint")
    for path in files:
        digest.update(f"{path.name}:{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def ids_digest(ids: Sequence[torch.Tensor]) -> str:
    """sha256 of a list of calibration token-id tensors (values and lengths).

    Example:
        >>> ids_digest([torch.tensor([1, 2])]) == ids_digest([torch.tensor([1, 2])])
        True
    """
    digest = hashlib.sha256()
    for sample in ids:
        data = sample.detach().reshape(-1).to(torch.int64).contiguous()
        digest.update(f"{data.numel()}:".encode())
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(tensors.items())}, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return _sha256_file(path)


class Checkpoint:
    """The checkpoint of one compression run, kept in `folder`: its fingerprint and committed entries.

    `weights` identifies the source weights (see `weights_digest`); `resume` continues a matching
    checkpoint instead of replacing it. `compress(..., checkpoint=...)` calls `begin` once; passes save
    and load their entries (`save_entry`, `load_entry`; the layer solve's blocks in
    `passes/block_checkpoint.py`); the caller calls `discard` once the result is saved.

    Example:
        >>> Checkpoint("/tmp/.x.checkpoint", weights="abc").resume
        False
    """

    def __init__(self, folder: str | Path, *, weights: str, resume: bool = False):
        self.folder, self.weights, self.resume = Path(folder), weights, resume
        self._fingerprint: dict[str, Any] | None = None

    @classmethod
    def for_output(cls, out: str | Path, source: str | Path | nn.Module, *, resume: bool = False) -> Checkpoint:
        """The checkpoint of a run writing `out` from `source` (a model folder or module)."""
        return cls(checkpoint_folder(out), weights=weights_digest(source), resume=resume)

    def fingerprint(self, recipe: Any, ids: Sequence[torch.Tensor], settings: dict[str, Any]) -> dict[str, Any]:
        """Everything the compressed result depends on, as JSON-able values."""
        from . import __version__

        body = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "sparsepress_version": __version__,
            "weights_sha256": self.weights,
            "recipe": recipe.to_dict(),
            "calibration_sha256": ids_digest(ids),
            "seed": recipe.seed,
            "settings": settings,
        }
        return json.loads(json.dumps(body, sort_keys=True))

    def begin(self, recipe: Any, ids: Sequence[torch.Tensor], settings: dict[str, Any]) -> None:
        """Check (resume) or start (otherwise) the checkpoint of a run with this recipe and calibration."""
        current = self.fingerprint(recipe, ids, settings)
        self._fingerprint = current
        path = self.folder / FINGERPRINT
        if self.resume and path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise FormatError(path, f"unreadable checkpoint fingerprint: {exc}; rerun without --resume") from None
            if stored != current:
                stored = stored if isinstance(stored, dict) else {}
                differing = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
                raise InputError(self.folder, "checkpoint belongs to another run (different "
                                 f"{', '.join(differing)}); rerun without --resume to start over")
            return
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        _atomic_write_bytes(path, (json.dumps(current, indent=2, sort_keys=True) + "\n").encode())

    def save_entry(self, stem: str, files: dict[str, dict[str, torch.Tensor]], body: dict[str, Any]) -> None:
        """Commit entry `stem`: each tensors file of `files` (name -> tensors), then `stem.json` holding
        `body` and the files' sha256, written last; a crash before that leaves the entry uncommitted."""
        shas = {name: _atomic_save_tensors(self.folder / name, tensors) for name, tensors in files.items()}
        text = json.dumps({**body, "files": shas}, indent=2, sort_keys=True) + "\n"
        _atomic_write_bytes(self.folder / f"{stem}.json", text.encode())

    def has_entry(self, stem: str) -> bool:
        """Whether entry `stem` was committed (and the run is resuming from this checkpoint)."""
        return self.resume and (self.folder / f"{stem}.json").is_file()

    def load_entry(self, stem: str, files: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
        """The body of committed entry `stem` and its tensors files (those named in `files`, default all),
        each checked against its sha256; FormatError naming the file on any damage."""
        path = self.folder / f"{stem}.json"
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(path, f"unreadable checkpoint entry: {exc}; rerun without --resume") from None
        if not isinstance(body, dict) or not isinstance(body.get("files"), dict):
            raise FormatError(path, "not a checkpoint entry; rerun without --resume")
        wanted = body["files"] if files is None else files
        return body, {name: self._read_tensors(self.folder / name, body["files"].get(name)) for name in wanted}

    def remove(self, name: str) -> None:
        """Delete one file of the checkpoint, if it is there (data no later resume needs)."""
        (self.folder / name).unlink(missing_ok=True)

    def _read_tensors(self, path: Path, sha: Any) -> dict[str, torch.Tensor]:
        if not path.is_file():
            raise FormatError(path, "missing checkpoint file; rerun without --resume")
        if _sha256_file(path) != sha:
            raise FormatError(path, "checkpoint file is damaged (sha256 mismatch); rerun without --resume")
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise FormatError(path, f"unreadable checkpoint tensors: {exc}; rerun without --resume") from None

    def discard(self) -> None:
        """Delete the checkpoint folder (after the result is safely written)."""
        shutil.rmtree(self.folder, ignore_errors=True)


__all__ = ["Checkpoint", "checkpoint_folder", "ids_digest", "weights_digest"]
