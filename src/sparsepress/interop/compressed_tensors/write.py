"""`sparsepress export DIR --to compressed-tensors`: the closest faithful compressed-tensors layout.

Per packed layer: int8 weights as `int-quantized` (int8 codes, float32 scales per row or per group,
dynamic per-token int8 activations: W8A8, which is what our kernels compute), int4 as `pack-quantized`
(eight codes per int32 word, weight-only as llm-compressor writes W4A16), float weights stay float.
Sparse int8 and float layers go through the sparsity compressor: `sparse-24-bitmask` when every sparse
layer is 2:4, else `sparse-bitmask`; int4 layers keep their zeros inside the packed words and are named
in the sparsity config's targets with their structure. What the layout cannot say comes back as
warnings: BBS, CSR and N:M other than 2:4 become bitmask, quantized embedding tables are written as
float32. Reading the result with `sp.load` gives the same weights, bit for bit.

Example:
    >>> pack_int32(torch.tensor([[1, -1, 0, 7, -8, 2, 3, 4]], dtype=torch.int8), 4).tolist()
    [[-878643079]]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...errors import InputError
from ...formats import NMWeight, PackedWeight
from ...formats.base import mask_to_bits
from ...nn import QuantizedEmbedding, SparseLinear

LAYOUT_VERSION = "0.14.0"  # the compressed-tensors release whose layout this follows (the last with sparse formats)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' `pack_to_int32`: signed codes offset to unsigned, `32 // bits` per int32 word
    along the last dim, lowest bits first, zero-padded."""
    per_word = 32 // bits
    rows, cols = codes.shape
    unsigned = codes.to(torch.int64) + (1 << (bits - 1))
    padded = torch.nn.functional.pad(unsigned, (0, -cols % per_word))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (padded.view(rows, -1, per_word) << shifts).sum(dim=2)
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _sparse_kind(packed: PackedWeight) -> str | None:
    """'2:4', 'bitmask' or None (dense) for how a packed layer's zeros are laid out."""
    if packed.name == "dense":
        return None
    if isinstance(packed, NMWeight) and (packed.n, packed.m) == (2, 4):
        return "2:4"
    return "bitmask"


def _bitmask_parts(grid: torch.Tensor, two_four: bool) -> dict[str, torch.Tensor]:
    keep = grid != 0
    if two_four:  # exactly two per group of four, zeros kept where a group has fewer non-zeros
        from ...formats.nm import select_per_group

        rows, cols = grid.shape
        chosen = select_per_group(grid, 4, 2)
        keep = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter(2, chosen, True).view(rows, cols)
        return {"shape": torch.tensor(list(grid.shape)).reshape(-1, 1), "compressed": grid[keep].reshape(rows, cols // 2),
                "bitmask": mask_to_bits(keep)}
    counts = keep.sum(dim=1)
    return {"shape": torch.tensor(list(grid.shape)), "compressed": grid[keep], "bitmask": mask_to_bits(keep),
            "row_offsets": torch.cumsum(counts, 0) - counts}


class _Plan:
    """Tensors, config groups and warnings collected layer by layer."""

    def __init__(self, two_four: bool) -> None:
        self.two_four = two_four  # sparse-24-bitmask for every stored sparse layer, else sparse-bitmask
        self.tensors: dict[str, torch.Tensor] = {}
        self.groups: dict[tuple[int, int | None], list[str]] = {}
        self.sparse: dict[str, str] = {}
        self.warnings: list[str] = []
        self.lost: dict[str, list[str]] = {}

    def lose(self, what: str, name: str) -> None:
        self.lost.setdefault(what, []).append(name)

    def add_linear(self, name: str, module: SparseLinear) -> None:
        packed = module.packed
        kind = _sparse_kind(packed)
        if kind == "bitmask" and packed.name != "bitmask":
            detail = f"{packed.n}:{packed.m}" if isinstance(packed, NMWeight) else packed.name
            self.lose(f"{detail} layout written as bitmask", name)
        if kind is not None:
            self.sparse[name] = kind
        if getattr(module, "act_thresholds", None) is not None:
            self.lose("activation-sparsity thresholds (a sparsepress run-time feature) dropped", name)
        grid = packed.dense_grid()
        if module.bias is not None:
            self.tensors[f"{name}.bias"] = module.bias
        if packed.dtype in ("fp32", "bf16"):
            self._add_weight(name, grid.float() if packed.dtype == "fp32" else grid, kind)
            return
        bits = 8 if packed.dtype == "int8" else 4
        if packed.group_size is not None and packed.in_features % packed.group_size:
            raise InputError(name, f"group size {packed.group_size} does not divide {packed.in_features} inputs; "
                                   "compressed-tensors needs whole groups")
        self.groups.setdefault((bits, packed.group_size), []).append(name)
        assert packed.scales is not None
        self.tensors[f"{name}.weight_scale"] = packed.scales.float().contiguous()
        if bits == 8:
            self._add_weight(name, grid.to(torch.int8), kind)
        else:
            self.tensors[f"{name}.weight_packed"] = pack_int32(grid.to(torch.int8), 4)
            self.tensors[f"{name}.weight_shape"] = torch.tensor(list(packed.shape))

    def _add_weight(self, name: str, grid: torch.Tensor, kind: str | None) -> None:
        if kind is None:
            self.tensors[f"{name}.weight"] = grid.contiguous()
        else:
            parts = _bitmask_parts(grid, kind == "2:4" and self.two_four)
            self.tensors.update({f"{name}.{k}": v.contiguous() for k, v in parts.items()})

    def quantization_config(self) -> dict[str, Any]:
        groups, formats = {}, set()
        for index, ((bits, group_size), names) in enumerate(sorted(self.groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0))):
            fmt = "int-quantized" if bits == 8 else "pack-quantized"
            formats.add(fmt)
            weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
                       "strategy": "channel" if group_size is None else "group", "group_size": group_size,
                       "observer": "minmax", "actorder": None, "block_structure": None}
            activations = ({"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token",
                            "group_size": None, "observer": None} if bits == 8 else None)
            groups[f"group_{index}"] = {"targets": sorted(names), "weights": weights,
                                        "input_activations": activations, "output_activations": None, "format": fmt}
        sparse_names = sorted(self.sparse)
        sparsity: dict[str, Any] = {}
        if sparse_names:
            two_four = all(kind == "2:4" for kind in self.sparse.values())
            stored = [n for n in sparse_names if f"{n}.compressed" in self.tensors]
            sparse_format = "sparse-24-bitmask" if two_four else "sparse-bitmask"
            sparsity = {"format": sparse_format if stored else "dense",
                        "sparsity_structure": "2:4" if two_four else "unstructured",
                        "targets": sparse_names, "ignore": [], "global_sparsity": None, "registry_requires_subclass": False}
        return {
            "quant_method": "compressed-tensors", "version": LAYOUT_VERSION,
            "format": (formats.pop() if len(formats) == 1 else "mixed-precision") if formats else "dense",
            "config_groups": groups, "ignore": [], "quantization_status": "compressed", "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": sparsity, "transform_config": {},
        }


def export_compressed_tensors(model: nn.Module, out: Path, source_folder: Path | None) -> list[str]:
    """Write `model` (a loaded sparsepress or compressed-tensors model) as a compressed-tensors folder
    at `out` (which must not hold anything yet); returns what could not be kept, one line each."""
    from ...io import _copy_side_files
    from ..hf.quantizer import strip_quantization_

    with torch.device("meta"):
        skeleton = type(model)(model.config)
    conv1d = [n for n, m in skeleton.named_modules() if type(m).__name__ == "Conv1D"]
    if conv1d:
        raise InputError(conv1d[0], "GPT-2 style Conv1D layers have no compressed-tensors layout (its targets are "
                                    "Linear layers); export --to hf or --to onnx instead")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    kinds = {_sparse_kind(m.packed) for m in linears.values()} - {None}
    plan = _Plan(two_four=kinds <= {"2:4"})
    if not plan.two_four and "2:4" in kinds:
        for name, m in linears.items():
            if _sparse_kind(m.packed) == "2:4" and m.packed.dtype != "int4":
                plan.lose("2:4 layout written as bitmask (sparse-bitmask covers every sparse layer)", name)
    for name, module in linears.items():
        plan.add_linear(name, module)
    done = tuple(f"{n}." for n in linears)
    for name, module in model.named_modules():
        if isinstance(module, QuantizedEmbedding):
            plan.tensors[f"{name}.weight"] = module.weight.float()
            plan.lose(f"int{module.bits} embedding table written as float32 (no compressed-tensors equivalent)", name)
            done += (f"{name}.",)
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if key.startswith(done) or key in plan.tensors:
            continue
        if tensor.untyped_storage().data_ptr() in seen:  # tied weights: stored once, tied again on load
            continue
        seen.add(tensor.untyped_storage().data_ptr())
        plan.tensors[key] = tensor
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in sorted(plan.tensors.items())}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config
    strip_quantization_(config)
    config.save_pretrained(out)
    body = json.loads((out / "config.json").read_text(encoding="utf-8"))
    body["quantization_config"] = plan.quantization_config()
    body["architectures"] = [type(model).__name__]
    (out / "config.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if source_folder is not None:
        _copy_side_files(source_folder, out)
    return [f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)} layers)"
            for what, names in plan.lost.items()]
