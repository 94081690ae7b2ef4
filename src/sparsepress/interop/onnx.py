"""`sparsepress export DIR --to onnx`: a dense-equivalent ONNX graph that ONNX Runtime runs.

The packed model's exact weights (dequantized, as `export --to hf` writes them) go into a float32 graph
(`model.onnx`); `--dtype int8` adds ONNX Runtime's dynamic quantization of it (`model_int8.onnx`: int8
weights per channel, activations quantized per call), the int8 form ONNX Runtime runs fastest on CPUs.
Inputs are the tokenizer's (`input_ids`, `attention_mask`, and `token_type_ids` where the model takes
them), batch and sequence dynamic; the output is `last_hidden_state` for encoders and `logits` for
causal LMs (no KV cache). Shapes follow the folder's config, so structurally pruned models export
smaller. The tokenizer and config travel along; `onnx_export.json` records the measured agreement
with the packed model.

Example:
    >>> sorted(ONNX_DTYPES)
    ['fp32', 'int8']
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

ONNX_DTYPES = ("fp32", "int8")
OPSET = 17


class _Graph(nn.Module):
    """The plain model with positional inputs and one tensor out (what the exporter traces)."""

    def __init__(self, model: nn.Module, names: list[str], causal: bool):
        super().__init__()
        self.model, self.names, self.causal = model, names, causal

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = dict(zip(self.names, inputs))
        if self.causal:
            return self.model(**kwargs, use_cache=False).logits
        return self.model(**kwargs).last_hidden_state


def input_names(model: nn.Module) -> list[str]:
    """The token inputs `model.forward` takes, in a fixed order.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> input_names(BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)))
        ['input_ids', 'attention_mask', 'token_type_ids']
    """
    accepted = inspect.signature(model.forward).parameters
    return [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in accepted]


def export_onnx(model: nn.Module, out: Path, dtype: str = "fp32", samples: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """Write `model` (a loaded packed model) as ONNX into `out`; returns the file names and agreement."""
    from ..evaluate import is_causal_lm
    from .hf.export import plain_model

    if dtype not in ONNX_DTYPES:
        raise InputError("--dtype", f"got {dtype!r}; allowed: {' | '.join(ONNX_DTYPES)}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise InputError("--to onnx", "onnx and onnxruntime are not installed: pip install 'sparsepress[interop]'") from None
    plain = plain_model(model)
    plain.config._attn_implementation = "eager"  # SDPA's masking traces into ops older runtimes lack
    causal = is_causal_lm(plain)
    names = input_names(plain)
    vocab = int(getattr(plain.config, "vocab_size", 100))
    example = torch.randint(0, min(vocab, 1000), (2, 16), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": example, "attention_mask": torch.ones_like(example), "token_type_ids": torch.zeros_like(example)}
    output = "logits" if causal else "last_hidden_state"
    axes = {n: {0: "batch", 1: "sequence"} for n in [*names, output]}
    path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(_Graph(plain, names, causal).eval(), tuple(inputs[n] for n in names), str(path),
                          input_names=names, output_names=[output], dynamic_axes=axes, opset_version=OPSET,
                          dynamo=False)
    files = [path.name]
    if dtype == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(path), str(out / "model_int8.onnx"), weight_type=QuantType.QInt8, per_channel=True)
        files.append("model_int8.onnx")
    report = {"files": files, "inputs": names, "output": output,
              "agreement": {name: onnx_agreement(model, out / name, names, samples or [example[0]]) for name in files}}
    (out / "onnx_export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session on `path`.

    Example:
        >>> callable(onnx_session)
        True
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_agreement(model: nn.Module, path: Path, names: list[str], samples: list[torch.Tensor]) -> float:
    """Mean cosine between the ONNX graph's outputs and the packed model's, token by token."""
    session = onnx_session(path)
    scores = []
    for ids in samples:
        batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None], "token_type_ids": torch.zeros_like(ids)[None]}
        feed = {n: batch[n].numpy() for n in names}
        got = torch.from_numpy(session.run(None, feed)[0])
        with torch.no_grad():
            out = model(**{n: batch[n] for n in names})
        ours = out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
        scores.append(float(torch.nn.functional.cosine_similarity(got.reshape(-1, got.shape[-1]), ours.reshape(-1, ours.shape[-1]), dim=-1).mean()))
    return sum(scores) / len(scores)
