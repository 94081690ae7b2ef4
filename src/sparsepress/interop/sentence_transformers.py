"""`sp.load_sentence_transformer(DIR)`: a `SentenceTransformer` whose transformer runs the packed model.

sentence-transformers loads the folder's own modules (pooling, normalisation, prompts, max length) from
`modules.json`; its transformer module builds the model through `AutoModel.from_pretrained`, which our
quantizer (`interop.hf.quantizer`) answers with the packed layers. A compressed-tensors folder, or one
written before folders carried the sparsepress `quantization_config`, is routed to the quantizer by a
config override, so both load the same way.

Example:
    >>> callable(load_sentence_transformer)
    True
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def load_sentence_transformer(folder: str | Path, **kwargs: Any) -> Any:
    """A `sentence_transformers.SentenceTransformer` on the packed model of `folder` (ours or compressed-tensors).

    `kwargs` go to `SentenceTransformer` (e.g. `truncate_dim`). InputError when the folder is not a
    sentence-transformers layout or the package is missing.
    """
    from ..io import read_manifest
    from .compressed_tensors.read import is_compressed_tensors_folder
    from .hf.quantizer import SparsepressConfig, quantization_entry

    folder = Path(folder)
    if not (folder / "modules.json").is_file():
        raise InputError(folder, "no modules.json: not a sentence-transformers folder (use sp.load for plain models)")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise InputError(folder, "sentence-transformers is not installed: pip install 'sparsepress[interop]'") from None
    source = "compressed-tensors" if is_compressed_tensors_folder(folder) else "sparsepress"
    if source == "sparsepress":
        read_manifest(folder)  # a clear error for a damaged or foreign folder before transformers sees it
    config_kwargs, model_kwargs = dict(kwargs.pop("config_kwargs", {})), dict(kwargs.pop("model_kwargs", {}))
    if source == "compressed-tensors":  # replaces the folder's own quantization_config
        config_kwargs["quantization_config"] = quantization_entry(source)
    elif "quantization_config" not in json.loads((folder / "config.json").read_text(encoding="utf-8")):
        model_kwargs["quantization_config"] = SparsepressConfig()  # a folder saved before the stamp existed
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True, config_kwargs=config_kwargs,
                                model_kwargs=model_kwargs, **kwargs)
    return model.eval()
