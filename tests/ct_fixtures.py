"""compressed-tensors folders written by the compressed-tensors library itself (0.14: the last with the
sparse compressors), as llm-compressor writes them: a 2:4-pruned tiny LLaMA (or a given model),
scales from min/max, `ModelCompressor` compression, `save_pretrained`, `update_config`.

Example:
    >>> CT_CASES["w8a8-24"][:2]
    ('int-quantized', True)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

# name -> (quantization format, symmetric, bits, strategy, sparsity format or None, sparsity structure)
CT_CASES = {
    "w8a8-24": ("int-quantized", True, 8, "channel", "sparse-24-bitmask", "2:4"),
    "w8a8-bitmask": ("int-quantized", True, 8, "channel", "sparse-bitmask", "unstructured"),
    "w8-naive-group": ("naive-quantized", True, 8, "group", None, None),
    "w4a16-group": ("pack-quantized", True, 4, "group", None, None),
    "w4a16-asym-24": ("pack-quantized", False, 4, "group", "dense", "2:4"),
    "w4a16-asym-channel": ("pack-quantized", False, 4, "channel", None, None),
    "w8a8-tensor": ("int-quantized", True, 8, "tensor", None, None),
    "fp32-bitmask": (None, True, 8, "channel", "sparse-bitmask", "unstructured"),
    "w8-asym": ("naive-quantized", False, 8, "channel", None, None),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def prune_24_(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            with torch.no_grad():
                w = module.weight.view(-1, 4)
                w.scatter_(1, w.abs().topk(2, dim=1, largest=False).indices, 0.0)


def write_ct_folder(out: Path, case: str, model=None, shard: str | None = None, group_size: int = 32) -> Path:
    """Write `model` (default: a 2:4-pruned tiny LLaMA) with the compressed-tensors library into `out`."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    fmt, symmetric, bits, strategy, sparse_format, structure = CT_CASES[case]
    if model is None:
        model = tiny_llama()
        prune_24_(model)
    sparsity = None
    if sparse_format is not None:
        sparsity = SparsityCompressionConfig.load_from_registry(sparse_format, targets=["Linear"], ignore=["lm_head"],
                                                                sparsity_structure=structure, global_sparsity=0.5)
    if fmt is not None:
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy,
                                group_size=group_size if strategy == "group" else None)
        config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                                    ignore=["lm_head"], quantization_status="frozen")
        apply_quantization_config(model, config)
        for _, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            w = module.weight.data
            if strategy == "channel":
                low, high = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            elif strategy == "tensor":
                low, high = w.amin().reshape(1), w.amax().reshape(1)
            else:
                grouped = w.view(w.shape[0], -1, group_size)
                low, high = grouped.amin(-1), grouped.amax(-1)
            scale, zero = calculate_qparams(low, high, args)
            module.weight_scale.data = scale.to(module.weight_scale.dtype).reshape(module.weight_scale.shape)
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data = zero.to(module.weight_zero_point.dtype).reshape(module.weight_zero_point.shape)
    compressor = ModelCompressor.from_pretrained_model(model, sparsity_config_or_format=sparsity,
                                                       quantization_format=fmt)
    compressor.compress_model(model)
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    compressor.update_config(str(out))
    return out


def ct_reference_weight(folder: Path, name: str) -> torch.Tensor:
    """A layer's weight decompressed by the compressed-tensors library's own compressors (float32)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.config import SparsityCompressionConfig
    from compressed_tensors.quantization import QuantizationArgs

    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    state: dict[str, torch.Tensor] = {}
    for path in folder.glob("model*.safetensors"):
        state.update(load_file(str(path)))
    parts = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
    sparse = config.get("sparsity_config") or {}
    if "compressed" in parts:
        compressor = BaseCompressor.load_from_registry(
            sparse["format"], config=SparsityCompressionConfig.load_from_registry(sparse["format"]))
        parts["weight"] = compressor.decompress_weight({k: parts[k] for k in compressor.compression_param_names if k in parts})
    group = next(iter(config.get("config_groups", {}).values()), None)
    if group is None or "weight_scale" not in parts:
        return parts["weight"].float()
    args = QuantizationArgs.model_validate(group["weights"])
    compressor = BaseCompressor.load_from_registry(group.get("format") or config["format"], config=None)
    return compressor.decompress_weight(dict(parts), quantization_args=args).float()
