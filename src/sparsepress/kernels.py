"""Packed linear layers: native CPU kernels as torch custom ops, with a pure-torch reference path.

`packed_linear` is what `SparseLinear.forward` calls. It runs the native kernel when the extension
is loaded and has one for the weight's (format, dtype), else `reference_linear`, whose math is
exactly docs/formats.md: dequantize the weight, fake-quantize activations per token for int dtypes,
then matmul. The native buffers a weight needs beyond its stored tensors (row sums, nm masks, row
offsets) are built once and cached on the packed object.

Example:
    >>> import torch
    >>> from sparsepress.formats import BitmaskWeight
    >>> packed = BitmaskWeight.pack(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), dtype="fp32")
    >>> packed_linear(torch.tensor([[3.0, 4.0]]), packed, None).tolist()
    [[4.0, 6.0]]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import native
from .formats.base import PackedWeight, mask_to_bits
from .formats.elastic import ElasticWeight, level_scales, segment_sums
from .formats.values import is_integer
from .nn.activation import sparsify_inputs

_PLAN_ATTR = "_sparsepress_native_plan"
_is_compiling = torch.compiler.is_compiling


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of docs/formats.md: (xq as float [B, in], sx [B, 1]).

    Example:
        >>> xq, sx = quantize_activations(torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
        >>> xq.tolist(), sx.flatten().tolist()
        ([[64.0, -127.0], [0.0, 0.0]], [0.007874015718698502, 1.0])
    """
    sx = x2d.abs().amax(dim=-1, keepdim=True) / 127
    sx = torch.where(sx == 0, torch.ones_like(sx), sx)
    xq = torch.clamp(torch.round(x2d / sx), -127, 127)
    return xq, sx


def reference_linear(x2d: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch y[B, out] = x[B, in] W^T (+ bias) with the activation quantization of int dtypes.

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> p = DenseWeight.pack(torch.tensor([[1.0, -1.0]]), dtype="int8")
        >>> reference_linear(torch.tensor([[2.0, 1.0]]), p, None).tolist()  # x quantized per token: 1 -> 64/127*2
        [[0.9921259880065918]]
    """
    weight = packed.unpack()
    x2d = x2d.float()
    if is_integer(packed.dtype):
        xq, sx = quantize_activations(x2d)
        x2d = xq * sx
    return F.linear(x2d, weight, None if bias is None else bias.float())


# Activations the kernels can apply to their outputs in the same call: name -> (native code, torch).
ACTIVATIONS: dict[str, tuple[int, Any]] = {
    "gelu": (1, F.gelu),
    "gelu_tanh": (2, lambda y: F.gelu(y, approximate="tanh")),
    "relu": (3, F.relu),
    "silu": (4, F.silu),
}


def activation_code(name: str | None) -> int:
    """The native code of a fused activation (0: none); ValueError naming the choices otherwise.

    Example:
        >>> activation_code("gelu"), activation_code(None)
        (1, 0)
    """
    if name is None:
        return 0
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name][0]


@dataclass(frozen=True)
class _Plan:
    """A packed weight prepared for one native kernel (kind + tensors + sizes) and its handle."""

    source: torch.Tensor  # the packed.values it was built from, to notice a swapped weight
    kind: str  # masked | dense_int8 | csr
    tensors: tuple[torch.Tensor, ...]
    in_features: int
    out_features: int
    group_size: int  # 0: one scale per row
    handle: Any


def _kind_of(packed: PackedWeight) -> str | None:
    """Which native kernel family runs this weight, or None (reference path)."""
    if packed.dtype not in ("fp32", "bf16", "int8", "int4"):
        return None
    if packed.name in ("bitmask", "nm", "bbs"):
        return "masked"
    if packed.name == "csr" and packed.dtype in ("fp32", "int8", "int4"):
        return "csr"
    if packed.name == "dense" and packed.dtype in ("int8", "int4"):
        return "dense_int8"
    return None


def native_supports(packed: PackedWeight) -> bool:
    """Whether `packed_linear` runs this weight on a native kernel here.

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> native_supports(DenseWeight.pack(torch.ones(2, 2), dtype="bf16"))
        False
    """
    return native.native_available() and _kind_of(packed) is not None


def dense_int8_available() -> bool:
    """Whether a native dense int8 kernel exists here (the baseline `format: auto` compares against).

    Example:
        >>> isinstance(dense_int8_available(), bool)
        True
    """
    return native.native_available()


def _row_sums(packed: PackedWeight) -> torch.Tensor:
    """Sum of the stored integers per row and scale group, int32 [out, n_groups]."""
    grid = packed.dense_grid().to(torch.int32)
    out_features, in_features = packed.shape
    size = packed.group_size or in_features
    groups = -(-in_features // size)
    padded = F.pad(grid, (0, groups * size - in_features))
    return padded.view(out_features, groups, size).sum(dim=2, dtype=torch.int32).contiguous()


def _stream_values(packed: PackedWeight, count: int) -> torch.Tensor:
    """The `count` stored values as the kernels read them: int4 widened to int8 (the int8 kernels
    then run int4 weights: same integers, same scales), bf16 as its 16-bit patterns."""
    if packed.dtype == "int4":
        return packed._logical_values((count,)).contiguous()
    values = packed.values.reshape(-1)  # type: ignore[attr-defined]
    if values.dtype == torch.bfloat16:
        values = values.view(torch.int16)  # the kernels widen bf16 bits themselves
    return values.contiguous()


def _masked_layout(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask bits, row offsets) of a bitmask / nm / bbs weight seen as one masked value stream.

    nm indices become mask bits here (one bit per weight: as many bytes as the indices of 2:4,
    fewer than those of 4:8), so one kernel streams all three formats.
    """
    out_features, in_features = packed.shape
    if packed.name == "bitmask":
        return packed.mask.contiguous(), packed.row_offsets.contiguous()  # type: ignore[attr-defined]
    if packed.name == "bbs":
        per_row = in_features // packed.bank * packed.k  # type: ignore[attr-defined]
        mask = packed.mask.contiguous()  # type: ignore[attr-defined]
    else:
        m = packed.m  # type: ignore[attr-defined]
        offsets = packed.group_offsets()  # type: ignore[attr-defined]
        keep = torch.zeros(out_features, in_features // m, m, dtype=torch.bool).scatter_(2, offsets, True)
        mask = mask_to_bits(keep.view(out_features, in_features))
        per_row = offsets.shape[1] * offsets.shape[2]
    return mask, torch.arange(out_features + 1, dtype=torch.int64) * per_row


def _plan_tensors(packed: PackedWeight, kind: str) -> tuple[torch.Tensor, ...]:
    quant: tuple[torch.Tensor, ...] = ()
    if is_integer(packed.dtype):
        assert packed.scales is not None
        quant = (packed.scales.float().contiguous(), _row_sums(packed))
    if kind == "masked":
        mask, offsets = _masked_layout(packed)
        return (mask, _stream_values(packed, int(offsets[-1])), offsets, *quant)
    if kind == "csr":
        row_ptr = packed.row_ptr.contiguous()  # type: ignore[attr-defined]
        return (row_ptr, packed.col_indices.contiguous(),  # type: ignore[attr-defined]
                _stream_values(packed, int(row_ptr[-1])), *quant[:1])
    out_features, in_features = packed.shape
    return (_stream_values(packed, out_features * in_features).view(out_features, in_features), *quant)


# Which int8 layers get their many-token GEMM panels packed once instead of on every call. A panel
# costs about one byte per weight beside the packed weight (at 50%: two bytes per kept value).
#   small: layers under 4M weights, when the handle is made: packing them per call would cost more
#          than their GEMM (MiniLM at 16 tokens: 1536x384 from 58 to 37 us a call).
#   auto (default): small, and each bigger sparse layer on its first call of 12..63 tokens, where packing
#          per call costs most (LLaMA-7B shapes at 16 tokens: 1.0-2.6x over fbgemm instead of
#          0.9-1.1x); decode (1 token) never builds them, nor do long prefills (64+, packing amortized)
#          on AVX-512; on AVX2, whose per-call packing costs more than its GEMM, long calls build them too.
#   all:   every int8 layer, when the handle is made. none: packed per call everywhere.
# Each policy maps to (weight limit for panels at once, whether bigger layers get them lazily);
# SPARSEPRESS_PANELS sets it.
PANEL_POLICIES: dict[str, tuple[int, bool]] = {
    "none": (0, False), "small": (4 << 20, False), "auto": (4 << 20, True), "all": (1 << 62, False),
}
PANELS = os.environ.get("SPARSEPRESS_PANELS", "") or "auto"
if PANELS not in PANEL_POLICIES:
    raise RuntimeError(f"SPARSEPRESS_PANELS={PANELS!r}: expected one of {', '.join(PANEL_POLICIES)}")


def _make_handle(kind: str, tensors: list[torch.Tensor] | tuple[torch.Tensor, ...], in_features: int,
                 group_size: int, panels: bool = True) -> Any:
    """The native handle of a prepared weight; `panels=False` for throwaway handles (no GEMM panels, no
    gather rows: nothing prepared that a single call would not repay)."""
    lib = native.module()
    assert lib is not None
    limit, lazy = PANEL_POLICIES[PANELS] if panels else PANEL_POLICIES["none"]
    if kind == "masked":
        return lib.masked_linear(*tensors[:3], in_features, *tensors[3:], group_size=group_size,
                                 panel_limit=limit, lazy_panels=lazy, gather_rows=panels)
    if kind == "csr":
        return lib.csr_linear(*tensors[:3], in_features, *tensors[3:], group_size=group_size)
    # dense int8 layers keep to the eager limit: a panel would double a big one's memory, and its
    # GEMM skips no zeros to pay for that
    return lib.dense_int8_linear(*tensors, group_size=group_size, panel_limit=limit, lazy_panels=False)


@torch.compiler.disable
def _build_plan(packed: PackedWeight) -> _Plan | None:
    kind = _kind_of(packed)
    if kind is None or not native.native_available():
        return None
    tensors = _plan_tensors(packed, kind)
    group_size = packed.group_size or 0
    handle = _make_handle(kind, tensors, packed.shape[1], group_size)
    plan = _Plan(packed.values, kind, tensors, packed.shape[1], packed.shape[0], group_size, handle)  # type: ignore[attr-defined]
    try:
        setattr(packed, _PLAN_ATTR, plan)
    except AttributeError:  # a slotted / frozen subclass: rebuild per call, still correct
        pass
    return plan


def release_plan(packed: PackedWeight) -> None:
    """Drop the native handle cached on a packed weight (rebuilt on its next use).

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> p = DenseWeight.pack(torch.ones(2, 2), dtype="int8")
        >>> _ = packed_linear(torch.ones(1, 2), p); release_plan(p)
        >>> hasattr(p, _PLAN_ATTR)
        False
    """
    packed.__dict__.pop(_PLAN_ATTR, None)


def native_handle(packed: PackedWeight) -> Any | None:
    """The prepared native handle (`_native.NativeLinear`) that runs this weight, or None (reference path).

    The runtime's block plans call these same handles from native code (one per weight, shared with
    `packed_linear`).

    Example:
        >>> from sparsepress.formats import DenseWeight
        >>> handle = native_handle(DenseWeight.pack(torch.ones(3, 2), dtype="int8"))
        >>> handle is None or (handle.in_features, handle.out_features) == (2, 3)
        True
    """
    plan = _plan_of(packed)
    return plan.handle if plan is not None else None


def _plan_of(packed: PackedWeight) -> _Plan | None:
    plan = getattr(packed, _PLAN_ATTR, None)
    if plan is not None and plan.source is packed.values:  # type: ignore[attr-defined]
        return plan
    return _build_plan(packed)


@torch.library.custom_op("sparsepress::packed_linear", mutates_args=())
def _packed_linear_op(
    x: torch.Tensor,
    weight: list[torch.Tensor],
    kind: str,
    in_features: int,
    out_features: int,
    group_size: int,
    bias: torch.Tensor | None,
    activation: int = 0,
) -> torch.Tensor:
    """Native act(y[B, out]) for a prepared weight (the tensors of a `_Plan`); what torch.compile sees."""
    # a handle per call (the op gets tensors, not our cached plan): no panels to pack each time
    handle = _make_handle(kind, weight, in_features, group_size, panels=False)
    x = x.contiguous().float()
    y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
    handle(x, y, None if bias is None else bias.float().contiguous(), torch.get_num_threads(), activation)
    return y


@_packed_linear_op.register_fake
def _(x, weight, kind, in_features, out_features, group_size, bias, activation=0):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)


def packed_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None,
                  activation: str | None = None, threshold: float = 0.0) -> torch.Tensor:
    """y[..., out] = act(x[..., in] W^T (+ bias)) for a packed weight; native kernel where one exists.

    `activation` (one of ACTIVATIONS, or None) is applied to the outputs inside the same call.
    `threshold` > 0: inputs of magnitude below it count as zero (activation sparsity: the result is
    that of `sparsify_inputs(x, threshold)`); the native int8 kernels then skip the weight columns of
    zero inputs at few tokens (csrc/colskip.h), where that is measured to pay.

    Example:
        >>> from sparsepress.formats import NMWeight
        >>> p = NMWeight.pack(torch.tensor([[0.0, 1.0, 0.0, -2.0]]), dtype="fp32", n=2, m=4)
        >>> packed_linear(torch.ones(3, 4), p).shape
        torch.Size([3, 1])
        >>> packed_linear(torch.ones(1, 4), p, activation="relu").tolist()
        [[0.0]]
    """
    code = activation_code(activation)
    plan = getattr(packed, _PLAN_ATTR, None)
    if plan is None or plan.source is not packed.values:  # type: ignore[attr-defined]
        plan = _build_plan(packed)
    fast = (plan is not None and x.dtype == torch.float32 and x.is_cpu and not _is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled()))
    if threshold > 0.0 and not fast:
        x = sparsify_inputs(x, threshold)
    if fast:
        assert plan is not None
        # Fast path (36 calls per MiniLM forward, ~10 us each at 16 tokens, so every step here
        # counts): raw addresses into the prepared handle, no DLPack conversion and no torch op
        # besides allocating y; activations are quantized in C++.
        in_features = plan.in_features
        if x.shape[-1] != in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
        if not x.is_contiguous():
            x = x.contiguous()
        bias_ptr = 0
        if bias is not None:
            if bias.dtype != torch.float32 or not bias.is_contiguous() or not bias.is_cpu:
                bias = bias.float().contiguous().cpu()
            if bias.numel() != plan.out_features:
                raise ValueError(f"bias has {bias.numel()} elements, the weight has {plan.out_features} outputs")
            bias_ptr = bias.data_ptr()
        shape = x.shape
        y = native.output_tensor(*shape[:-1], plan.out_features)
        rows = x.numel() // in_features if in_features else 0
        plan.handle.call_raw(x.data_ptr(), rows, y.data_ptr(), bias_ptr,
                             threads_for(rows * in_features * plan.out_features), code, threshold)
        return y
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    out_features = packed.shape[0]
    if plan is None or (x2d.requires_grad and torch.is_grad_enabled()):
        if packed.name == "dense" and packed.dtype == "fp32":
            y = F.linear(x2d.float(), packed.values, bias)  # type: ignore[attr-defined]
        else:
            y = reference_linear(x2d, packed, bias)
        if code:
            y = ACTIVATIONS[activation][1](y)  # type: ignore[index]
    elif _is_compiling():
        y = _packed_linear_op(x2d, list(plan.tensors), plan.kind, plan.in_features, out_features,
                              plan.group_size, bias, code)
    else:
        x2d = x2d.float().contiguous()
        if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
            bias = bias.float().contiguous()
        y = native.output_tensor(x2d.shape[0], out_features)
        plan.handle(x2d, y, bias, torch.get_num_threads(), code)
    return y.reshape(*lead, out_features)


_ELASTIC_ATTR = "_sparsepress_elastic_plan"


@dataclass(frozen=True)
class _ElasticPlan:
    """An elastic weight prepared for the native kernels (csrc/elastic.h): one handle, every level."""

    source: torch.Tensor  # the packed.values it was built from
    tensors: tuple[Any, ...]  # what the handle points into
    handle: Any


def _build_elastic_plan(packed: ElasticWeight) -> _ElasticPlan | None:
    if not native.native_available():
        return None
    values = packed.values.view(torch.int16) if packed.values.dtype == torch.bfloat16 else packed.values
    scales: list[torch.Tensor] = []
    rowsums: list[torch.Tensor] = []
    if is_integer(packed.dtype):  # scales per level, rowsums per segment (the same at every level)
        sums = segment_sums(packed)
        scales = [level_scales(packed, i) for i in range(packed.n_levels)]
        rowsums = [sums[j].contiguous() for j in range(packed.n_levels)]
    limit, lazy = PANEL_POLICIES[PANELS]
    masks, offsets = packed.masks.contiguous(), packed.offsets.contiguous()
    handle = native.module().elastic_linear(  # type: ignore[union-attr]
        masks, values.contiguous(), offsets, packed.shape[1], packed.seg, scales, rowsums,
        group_size=packed.group_size or 0, panel_limit=limit, lazy_panels=lazy)
    plan = _ElasticPlan(packed.values, (masks, values, offsets, scales, rowsums), handle)
    packed.__dict__[_ELASTIC_ATTR] = plan
    return plan


def elastic_native_plan(packed: ElasticWeight) -> Any:
    """The native handle of an elastic weight (built once and cached on it), or None without the extension.

    Example:
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> p = ElasticWeight.pack(w, dtype="int8", keeps=[w != 0, w > 1], levels=[0.5, 0.75])
        >>> plan = elastic_native_plan(p)
        >>> plan is None or plan.levels == 2
        True
    """
    plan = packed.__dict__.get(_ELASTIC_ATTR)
    if plan is None or plan.source is not packed.values:
        plan = _build_elastic_plan(packed)
    return None if plan is None else plan.handle


def reference_elastic_linear(x2d: torch.Tensor, packed: ElasticWeight, level: int,
                             bias: torch.Tensor | None) -> torch.Tensor:
    """Pure-torch y = x W_level^T (+ bias) with the activation quantization of int dtypes.

    Example:
        >>> w = torch.tensor([[1.0, 0.5]])
        >>> p = ElasticWeight.pack(w, keeps=[w != 0, w > 0.6], levels=[0.0, 0.5])
        >>> reference_elastic_linear(torch.ones(1, 2), p, 1, None).tolist()
        [[1.0]]
    """
    x2d = x2d.float()
    if is_integer(packed.dtype):
        xq, sx = quantize_activations(x2d)
        x2d = xq * sx
    return F.linear(x2d, packed.unpack(level), None if bias is None else bias.float())


def elastic_linear(x: torch.Tensor, packed: ElasticWeight, level: int, bias: torch.Tensor | None = None,
                   activation: str | None = None) -> torch.Tensor:
    """y[..., out] = act(x[..., in] W_level^T (+ bias)) at level index `level` (0: the lowest sparsity).

    One native call runs that level's segments only, so it skips exactly its zeros (csrc/elastic.h);
    else the reference path.

    Example:
        >>> w = torch.tensor([[2.0, 1.0]])
        >>> p = ElasticWeight.pack(w, keeps=[w != 0, w > 1.5], levels=[0.0, 0.5])
        >>> elastic_linear(torch.ones(1, 2), p, 0).tolist(), elastic_linear(torch.ones(1, 2), p, 1).tolist()
        ([[3.0]], [[2.0]])
    """
    code = activation_code(activation)
    if not 0 <= level < packed.n_levels:
        raise IndexError(f"level index {level} out of range for {packed.n_levels} levels")
    in_features, out_features = packed.shape[1], packed.shape[0]
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {in_features}")
    handle = elastic_native_plan(packed)
    if (handle is not None and x.dtype == torch.float32 and x.is_cpu and not _is_compiling()
            and not (x.requires_grad and torch.is_grad_enabled())):
        if not x.is_contiguous():
            x = x.contiguous()
        bias_ptr = 0
        if bias is not None:
            if bias.dtype != torch.float32 or not bias.is_contiguous() or not bias.is_cpu:
                bias = bias.float().contiguous().cpu()
            if bias.numel() != out_features:
                raise ValueError(f"bias has {bias.numel()} elements, the weight has {out_features} outputs")
            bias_ptr = bias.data_ptr()
        y = native.output_tensor(*x.shape[:-1], out_features)
        rows = x.numel() // in_features
        handle.call_raw(x.data_ptr(), rows, y.data_ptr(), bias_ptr,
                        threads_for(rows * in_features * out_features), code, level)
        return y
    lead = x.shape[:-1]
    y = reference_elastic_linear(x.reshape(-1, in_features), packed, level, bias)
    if code:
        y = ACTIVATIONS[activation][1](y)  # type: ignore[index]
    return y.reshape(*lead, out_features)


# With sparsepress's own pool, calls below this many multiply-adds run on the calling thread: waking
# the pool's helper costs more than it saves, and its spinning competes with torch's threads between
# our layers (MiniLM at 16 tokens: end to end 8.7 -> 7.3 ms). On torch's OpenMP team (the default)
# the helper is already spinning, and splitting even 384x384 x 16 tokens pays (3.85 -> 3.58 ms).
SINGLE_THREAD_MACS = {"openmp": 0, "own": 4_000_000, "none": 0}


def threads_for(macs: int) -> int:
    """Threads for a call of `macs` multiply-adds: 1 for small work on our own pool, else torch's count.

    Example:
        >>> threads_for(1000) in (1, torch.get_num_threads())
        True
    """
    return 1 if macs < SINGLE_THREAD_MACS[native.parallel_backend()] else torch.get_num_threads()


__all__ = [
    "ACTIVATIONS",
    "activation_code",
    "dense_int8_available",
    "native_handle",
    "elastic_linear",
    "elastic_native_plan",
    "native_supports",
    "packed_linear",
    "quantize_activations",
    "reference_elastic_linear",
    "reference_linear",
    "release_plan",
]
