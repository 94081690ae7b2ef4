"""`sparsepress export DIR --to hf`: a plain transformers folder that loads without sparsepress.

Every packed layer is written as its dequantized dense float32 weight (the exact weights sparsepress
runs; activations are no longer quantized per token, so outputs match `sp.load(DIR)` up to that
rounding, and exactly for `format: dense` fp32 folders), into a model built from the folder's own
config, so shapes a structured pass rewrote carry over. Shapes that a plain config cannot express
(non-uniform per-layer sizes) are refused, naming the first layer that differs. Tokenizer,
generation and sentence-transformers files travel along; `README.md` is a model card with the
recipe, the sizes and the measured agreement with the packed model (and fidelity to the dense source
when the folder records one that is reachable).

Example:
    >>> import torch
    >>> from sparsepress.nn import SparseLinear
    >>> m = torch.nn.Sequential(SparseLinear.from_linear(torch.nn.Linear(4, 2), format="dense", dtype="fp32"))
    >>> sorted(dense_state(m))
    ['0.bias', '0.weight']
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import InputError
from ...nn import QuantizedEmbedding, SparseLinear


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state as plain dense float tensors: packed layers dequantized, embeddings expanded."""
    state: dict[str, torch.Tensor] = {}
    replaced: tuple[str, ...] = ()
    for name, module in model.named_modules():
        if isinstance(module, SparseLinear):
            state[f"{name}.weight"] = module.packed.unpack()
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.float()
            replaced += (f"{name}.",)
        elif isinstance(module, QuantizedEmbedding):
            state[f"{name}.weight"] = module.weight
            replaced += (f"{name}.",)
    for key, tensor in model.state_dict().items():
        if not key.startswith(replaced) and key not in state:
            state[key] = tensor.float() if tensor.is_floating_point() else tensor
    return state


def plain_model(model: nn.Module) -> nn.Module:
    """A fresh transformers model of `model`'s class and config holding `dense_state(model)`.

    InputError when the packed model's shapes differ from what its config builds (per-layer sizes a
    plain config cannot express).
    """
    from ...models.moe import fold_expert_tensors
    from .quantizer import strip_quantization_

    config = getattr(model, "config", None)
    if config is None:
        raise InputError(type(model).__name__, "not a transformers model: nothing to export as a transformers folder")
    config = type(config).from_dict(config.to_dict())
    strip_quantization_(config)
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights  # type: ignore[no-redef]
    with no_init_weights():
        fresh = type(model)(config)
    conv1d = {name for name, m in fresh.named_modules() if type(m).__name__ == "Conv1D"}
    # Routed experts (one Linear per expert matrix here) go back into transformers' fused tensors.
    state = fold_expert_tensors(dense_state(model), model)
    for name in conv1d:  # our Linear view of GPT-2's Conv1D, back to its [in, out] layout
        if f"{name}.weight" in state:
            state[f"{name}.weight"] = state[f"{name}.weight"].t().contiguous()
    expected = fresh.state_dict()
    for key, tensor in state.items():
        if key in expected and tuple(expected[key].shape) != tuple(tensor.shape):
            raise InputError(key, f"shape {list(tensor.shape)} differs from the {list(expected[key].shape)} that the "
                                  "folder's config builds: per-layer sizes a plain transformers config cannot express; "
                                  "keep the sparsepress folder (or export --to onnx)")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise InputError(unexpected[0], f"{len(unexpected)} tensors have no place in {type(fresh).__name__} built from "
                                        "the folder's config")
    result = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "all_tied_weights_keys", {}) or {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise InputError(missing[0], f"missing from the packed model ({len(missing)} tensors)")
    if hasattr(fresh, "tie_weights"):
        fresh.tie_weights()
    return fresh.eval()


def model_card(manifest: dict[str, Any], sizes: dict[str, int], measured: dict[str, float], folder: Path) -> str:
    """The exported folder's README: what it is, how it was made, how big, how faithful.

    Example:
        >>> "recipe" in model_card({"recipe": None, "model_class": "BertModel"}, {}, {}, Path("x"))
        True
    """
    import yaml

    from ...report import human_bytes

    recipe = manifest.get("recipe")
    lines = [
        "---", "library_name: transformers", "tags: [sparsepress, pruned, quantized]", "---", "",
        f"# {manifest.get('model_class', 'model')} exported from a sparsepress folder", "",
        f"Dense float32 weights of the sparsepress folder `{folder.name}` (source: {manifest.get('source') or 'not recorded'}). "
        "Loads with plain transformers; pruned weights are stored as zeros and quantized weights at their "
        "dequantized values, so the file has the dense size. Run the packed folder with sparsepress for the small, fast form.", "",
        "## recipe", "", "```yaml", (yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "# not recorded"), "```", "",
        "## sizes", "", "| file | bytes |", "|---|---|",
        *(f"| {name} | {human_bytes(count)} |" for name, count in sizes.items()), "",
        "## measured", "", "| what | value |", "|---|---|",
        *(f"| {name} | {value:.4f} |" for name, value in measured.items()), "",
        "Agreement: mean cosine of mean-pooled outputs between this export and the packed model (sparsepress "
        "quantizes activations per token at run time; this export does not). Fidelity: the same against the "
        "dense source, on held-out WikiText-2 text.", "",
    ]
    return "\n".join(lines)


def export_hf(model: nn.Module, out: Path, folder: Path, manifest: dict[str, Any], samples: int = 16) -> dict[str, float]:
    """Write the plain transformers folder of `model` (loaded from `folder`) into `out`; what was measured."""
    from ...io import TENSORS, _copy_side_files
    from ...sources import load_source, read_text, token_samples

    plain = plain_model(model)
    plain.save_pretrained(out)
    _copy_side_files(folder, out)
    from ...evaluate import fidelity

    measured: dict[str, float] = {}
    tokenizer = None
    if any((folder / name).is_file() for name in ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    config = plain.config
    seq_len = min(128, int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 128))
    try:
        ids = token_samples(tokenizer, read_text(None, "heldout"), samples, seq_len, seed=1234,
                            source="bundled held-out text") if tokenizer is not None else None
    except InputError:  # a tokenizer that does not cover the text: nothing to measure with
        ids = None
    if ids is not None:
        measured["agreement with the packed model"] = fidelity(plain, model, ids)
        source = manifest.get("source")
        if source:
            try:
                reference = load_source(source).model
            except InputError:
                reference = None
            if reference is not None:
                measured["fidelity of this export to the dense source"] = fidelity(plain, reference, ids)
                measured["fidelity of the packed model to the dense source"] = fidelity(model, reference, ids)
    sizes = {f"sparsepress {name}": (folder / name).stat().st_size for name in (TENSORS,) if (folder / name).is_file()}
    sizes.update({f"export {p.name}": p.stat().st_size for p in sorted(out.glob("model*.safetensors"))})
    (out / "README.md").write_text(model_card(manifest, sizes, measured, folder), encoding="utf-8")
    (out / "sparsepress_export.json").write_text(json.dumps({"measured": measured, "sizes": sizes}, indent=2) + "\n")
    return measured
