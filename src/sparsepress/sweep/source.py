"""The source model as one picklable payload for Ray's object store: weights as numpy arrays plus side files.

The driver loads the model once, turns its state dict into numpy arrays (Ray hands those to every
worker zero-copy from shared memory) and keeps the small files a packed folder needs beside them
(config, tokenizer, sentence-transformers layout). Workers rebuild the model from that payload, so
a cluster's nodes need neither the model folder nor a second copy per trial.

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> folder = tempfile.mkdtemp()
    >>> BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                      intermediate_size=32, vocab_size=50)).save_pretrained(folder)
    >>> from sparsepress.sources import load_source
    >>> payload = pack_source(load_source(folder), name=folder)
    >>> with tempfile.TemporaryDirectory() as work:
    ...     model = rebuild_model(payload, work)
    >>> type(model).__name__, sorted(payload.files)[:1]
    ('BertModel', ['config.json'])
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..io import SIDE_FILES, SIDE_FOLDERS
from ..sources import Source

# numpy has no bfloat16: such tensors travel as int16 bit patterns and are viewed back.
_VIEWED = {torch.bfloat16: torch.int16}


@dataclass
class SourcePayload:
    """What a trial needs of the source: weights (numpy), side files (bytes), and a few facts."""

    name: str
    path: str
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str]
    files: dict[str, bytes] = field(default_factory=dict)
    causal: bool = False
    weights_bytes: int = 0

    @property
    def dense_folder_bytes(self) -> int:
        """A dense folder's size: the source's weight files plus the same side files a packed folder carries."""
        return self.weights_bytes + sum(len(data) for data in self.files.values())


def pack_source(source: Source, name: str) -> SourcePayload:
    """The payload for `source` (a loaded `sparsepress.sources.Source`); `name` is what the user typed."""
    from ..evaluate import is_causal_lm
    from ..report import dense_weights_bytes

    arrays, dtypes = {}, {}
    for key, tensor in source.model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        dtypes[key] = str(tensor.dtype).removeprefix("torch.")
        viewed = _VIEWED.get(tensor.dtype)
        arrays[key] = (tensor.view(viewed) if viewed is not None else tensor).numpy()
    return SourcePayload(
        name=str(name),
        path=str(source.path),
        arrays=arrays,
        dtypes=dtypes,
        files=side_files(Path(source.path)),
        causal=is_causal_lm(source.model),
        weights_bytes=dense_weights_bytes(source.path),
    )


def side_files(folder: Path) -> dict[str, bytes]:
    """config.json and the tokenizer / sentence-transformers files of a model folder, by relative path.

    Example:
        >>> from sparsepress.sources import resolve_model_path
        >>> "config.json" in side_files(resolve_model_path("minilm"))
        True
    """
    files = {}
    for name in ("config.json", *SIDE_FILES):
        if (folder / name).is_file():
            files[name] = (folder / name).read_bytes()
    for name in SIDE_FOLDERS:
        for path in sorted((folder / name).rglob("*")) if (folder / name).is_dir() else []:
            if path.is_file():
                files[str(path.relative_to(folder))] = path.read_bytes()
    return files


def write_files(files: dict[str, bytes], folder: str | Path) -> Path:
    """Write files given by relative path under `folder` (made if missing); returns the folder.

    Example:
        >>> import tempfile
        >>> (write_files({"a/b.txt": b"hi"}, tempfile.mkdtemp()) / "a" / "b.txt").read_text()
        'hi'
    """
    folder = Path(folder)
    for relative, data in files.items():
        target = folder / relative
        if os.path.isabs(relative) or ".." in Path(relative).parts:
            raise ValueError(f"refusing to write {relative!r} outside {folder}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def rebuild_model(payload: SourcePayload, workdir: str | Path) -> nn.Module:
    """A fresh float32 copy of the source model in eval mode, built from the payload (weights copied).

    The side files are written to `workdir/source` (where `source_folder` finds them afterwards).
    """
    from transformers import AutoConfig

    from ..sources import model_class_for

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]

    folder = source_folder(payload, workdir)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with no_init_weights():
        model = model_class_for(folder, config)(config)
    state = {}
    for key, array in payload.arrays.items():
        tensor = torch.from_numpy(np.array(array, copy=True))
        dtype = getattr(torch, payload.dtypes[key])
        state[key] = tensor.view(dtype) if dtype in _VIEWED else tensor
    model.load_state_dict(state, strict=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def source_folder(payload: SourcePayload, workdir: str | Path) -> Path:
    """The payload's side files as a folder (config, tokenizer): what `save(source=...)` copies from."""
    folder = Path(workdir) / "source"
    if not (folder / "config.json").is_file():
        write_files(payload.files, folder)
    return folder


def load_tokenizer(payload: SourcePayload, workdir: str | Path) -> Any:
    """The source's tokenizer rebuilt from its files, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source_folder(payload, workdir), local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
