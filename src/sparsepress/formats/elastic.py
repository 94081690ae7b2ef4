"""`elastic`: nested sparsity levels of one weight, stored once; the level is picked at run time.

Levels are sparsities s_0 < s_1 < ... < s_{L-1}; every weight kept at level i is kept at every lower
level. On disk the lowest level is packed in an ordinary format (`base`: bitmask, bbs, csr, nm or
dense, with its own tensors and `scales`), and beside it:

- `level_codes`: uint8 bit stream, `ceil(log2 L)` bits (at least 1) per non-zero of the lowest level,
  in row-major order: the index of the highest level that still keeps that weight;
- `level_gains`: float32 [L, out], each level's per-row factor on the scales (integer dtypes; 1 for float);
- `level_shifts`: float32 [L, out], added to the layer's bias at each level (layers with a bias only).

In memory the weight is held the way the kernels read it (csrc/elastic.h), segment-major: segment j
holds the weights whose highest level is j (level i keeps segments i..L-1) as an ordinary masked weight
of its own: `masks` uint8 [L, out, seg / 8] (segment j's rows one after another), `values` segment
after segment (row-major, column order inside a row), `offsets` int64 [L, out + 1] (segment j's row
starts, into `values`). Level i runs segments i..L-1 and adds them up, so it streams exactly its own
values and masks: with a row's segments side by side, the hardware prefetchers pulled in the skipped
ones too and the time did not follow the level. Each value is held once whatever the number of levels,
and the segments' GEMM panels (level-independent) serve every level.

Example:
    >>> import torch
    >>> w = torch.tensor([[4.0, 0.0, 2.0, 1.0], [0.0, 3.0, -1.0, 0.0]])
    >>> keeps = [w != 0, w.abs() >= 2]
    >>> p = ElasticWeight.pack(w, dtype="fp32", keeps=keeps, levels=[0.25, 0.5])
    >>> p.unpack(1).tolist()
    [[4.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]]
    >>> sorted(p.tensors()), ElasticWeight.from_tensors(p.tensors(), p.meta()).unpack(0).equal(w)
    (['level_codes', 'level_gains', 'mask', 'values'], True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..quant.grid import count_groups
from . import values as V
from .base import LayoutMismatch, PackedWeight, bits_to_mask, mask_to_bits, pack_bitstream, unpack_bitstream
from .bitmask import BitmaskWeight
from .bbs import BBSWeight
from .csr import CSRWeight
from .dense import DenseWeight
from .nm import NMWeight

BASE_FORMATS: dict[str, type[PackedWeight]] = {
    cls.name: cls for cls in (BitmaskWeight, BBSWeight, CSRWeight, NMWeight, DenseWeight)
}
_LEVEL_TENSORS = ("level_codes", "level_gains", "level_shifts")


def code_width(levels: int) -> int:
    """Bits per stored level code.

    Example:
        >>> code_width(2), code_width(3), code_width(5)
        (1, 2, 3)
    """
    return max(1, math.ceil(math.log2(max(levels, 1))))


def segment_width(in_features: int, group_size: int | None) -> int:
    """Columns of one segment's mask rows: `in_features` rounded up to whole 64-column windows (and groups),
    so every row's mask starts 8-byte aligned.

    Example:
        >>> segment_width(384, None), segment_width(100, None), segment_width(300, 128)
        (384, 128, 384)
    """
    unit = 64 if group_size is None else math.lcm(64, group_size)
    if group_size is not None and unit > 256:  # odd group sizes: byte-aligned segments suffice
        unit = math.lcm(8, group_size)
    return -(-in_features // unit) * unit


def check_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """Levels as a tuple of floats, strictly increasing in [0, 1); ValueError otherwise.

    Example:
        >>> check_levels([0.5, 0.7])
        (0.5, 0.7)
    """
    out = tuple(float(v) for v in levels)
    if not out or any(not 0.0 <= v < 1.0 for v in out) or any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"levels must be strictly increasing sparsities in [0, 1), got {list(levels)}")
    return out


def level_codes(keeps: Sequence[torch.Tensor], nonzero: torch.Tensor) -> torch.Tensor:
    """int64 [out, in]: the highest level index keeping each non-zero weight, -1 elsewhere.

    `keeps` are the bool keep-masks of the levels, lowest first, each inside the one before.

    Example:
        >>> keeps = [torch.tensor([[True, True, False]]), torch.tensor([[True, False, False]])]
        >>> level_codes(keeps, torch.tensor([[True, True, False]])).tolist()
        [[1, 0, -1]]
    """
    codes = torch.full(nonzero.shape, -1, dtype=torch.int64)
    for index, keep in enumerate(keeps):
        if index and bool((keep & ~keeps[index - 1]).any()):
            raise ValueError(f"level {index} keeps weights that level {index - 1} prunes: levels must nest")
        codes[keep.bool() & nonzero] = index
    return codes


def _segment_layout(grid: torch.Tensor, codes: torch.Tensor, levels: int, seg: int) -> dict[str, torch.Tensor]:
    """The in-memory layout (masks, values, offsets) of a grid whose non-zeros carry level codes: segment-major.

    Example:
        >>> grid = torch.tensor([[1.0, 2.0], [0.0, 3.0]])
        >>> layout = _segment_layout(grid, torch.tensor([[1, 0], [-1, 1]]), 2, 8)
        >>> layout["masks"].tolist(), layout["values"].tolist(), layout["offsets"].tolist()
        ([[[2], [0]], [[1], [2]]], [2.0, 1.0, 3.0], [[0, 1, 1], [1, 2, 3]])
    """
    out, in_features = grid.shape
    kept = codes >= 0
    wide_keep = torch.zeros(levels, out, seg, dtype=torch.bool)
    wide_values = torch.zeros(levels, out, seg, dtype=grid.dtype)
    rows, cols = kept.nonzero(as_tuple=True)
    segs = codes[rows, cols]
    wide_keep[segs, rows, cols] = True
    wide_values[segs, rows, cols] = grid[rows, cols]
    values = wide_values[wide_keep].contiguous()
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), wide_keep.sum(dim=2).flatten().cumsum(0)])
    # segment j's rows: starts[j * out .. (j + 1) * out] (its end is the next segment's start)
    offsets = starts.as_strided((levels, out + 1), (out, 1)).contiguous()
    masks = mask_to_bits(wide_keep.view(levels * out, seg)).view(levels, out, seg // 8)
    return {"masks": masks, "values": values, "offsets": offsets}


def _runtime_values(grid: torch.Tensor, dtype: str) -> torch.Tensor:
    # int4 is held widened to int8 in memory (the kernels run it on the int8 path anyway)
    return grid.to(torch.int8) if V.is_integer(dtype) else grid


@dataclass(eq=False, repr=False)
class ElasticWeight(PackedWeight):
    """Nested levels of one weight (see the module docstring); `unpack(i)` is level i's weight."""

    name: ClassVar[str] = "elastic"
    tensor_names: ClassVar[tuple[str, ...]] = ()
    levels: tuple[float, ...] = ()
    base: str = "bitmask"
    base_params: dict[str, int] = field(default_factory=dict)
    seg: int = 0
    masks: torch.Tensor = None  # type: ignore[assignment]  uint8 [L, out, seg / 8], segment-major
    values: torch.Tensor = None  # type: ignore[assignment]  segment after segment (int8 | float32 | bfloat16)
    offsets: torch.Tensor = None  # type: ignore[assignment]  int64 [L, out + 1], segment j's row starts
    gains: torch.Tensor = None  # type: ignore[assignment]  float32 [L, out]
    shifts: torch.Tensor | None = None  # float32 [L, out]

    @classmethod
    def _layout(cls, grid: torch.Tensor, dtype: str, keeps: Sequence[torch.Tensor] = (),
                levels: Sequence[float] = (), base: str = "bitmask", gains: torch.Tensor | None = None,
                shifts: torch.Tensor | None = None, grouping: int | None = None, **base_params: Any) -> dict[str, Any]:
        levels = check_levels(levels)
        if len(keeps) != len(levels):
            raise ValueError(f"{len(keeps)} keep-masks for {len(levels)} levels")
        if base not in BASE_FORMATS:
            raise ValueError(f"unknown base format {base!r}; allowed: {' | '.join(BASE_FORMATS)}")
        out = grid.shape[0]
        if bool((grid.ne(0) & ~keeps[0].bool()).any()):
            raise ValueError("the weight has non-zeros outside the lowest level's keep-mask")
        codes = level_codes(keeps, grid.ne(0))
        base_layout = BASE_FORMATS[base]._layout(grid, dtype, **base_params)  # ValueError when it does not fit
        params = {p: int(base_layout[p]) for p in BASE_FORMATS[base].params}
        gains = torch.ones(len(levels), out) if gains is None else gains.detach().float().contiguous()
        if gains.shape != (len(levels), out) or not bool(torch.isfinite(gains).all() and (gains > 0).all()):
            raise ValueError(f"gains must be finite, positive float32 [{len(levels)}, {out}]")
        if shifts is not None:
            shifts = shifts.detach().float().contiguous()
            if shifts.shape != (len(levels), out) or not bool(torch.isfinite(shifts).all()):
                raise ValueError(f"shifts must be finite float32 [{len(levels)}, {out}]")
        seg = segment_width(grid.shape[1], grouping)
        return {"levels": levels, "base": base, "base_params": params, "seg": seg, "gains": gains, "shifts": shifts,
                **_segment_layout(_runtime_values(grid, dtype), codes, len(levels), seg)}

    @classmethod
    def pack(cls, weight: torch.Tensor, dtype: str = "fp32", scales: torch.Tensor | None = None,
             group_size: int | None = None, **params: Any) -> ElasticWeight:
        """Pack `weight` (zero outside `keeps[0]`) with nested `keeps` for `levels`; see the module example.

        `params`: keeps (bool masks, lowest level first), levels, base (default bitmask) and its
        parameters, gains, shifts.
        """
        return super().pack(weight, dtype, scales, group_size, grouping=group_size, **params)  # type: ignore[return-value]

    # --- views ------------------------------------------------------------------------------------------
    @property
    def n_levels(self) -> int:
        return len(self.levels)

    def _wide_keep(self) -> torch.Tensor:
        """bool [L, out, seg]: segment j's mask at [j]."""
        out = self.shape[0]
        return bits_to_mask(self.masks.reshape(self.n_levels * out, -1), self.seg).view(self.n_levels, out, self.seg)

    def codes(self) -> torch.Tensor:
        """int64 [out, in]: the highest level index keeping each weight, -1 where none does."""
        wide = self._wide_keep()[:, :, : self.shape[1]]
        index = torch.arange(self.n_levels).view(-1, 1, 1)
        return torch.where(wide.any(dim=0), (wide * index).sum(dim=0), torch.full((), -1))

    def level_mask(self, level: int) -> torch.Tensor:
        """bool [out, in]: the weights level `level` (an index, 0 = lowest sparsity) keeps."""
        return self.codes() >= self._index(level)

    def dense_grid(self, level: int = 0) -> torch.Tensor:
        """The stored grid [out, in] of level `level` (int8 integers or float), zeros where it prunes."""
        level = self._index(level)
        out, in_features = self.shape
        wide = torch.zeros(self.n_levels, out, self.seg, dtype=self.values.dtype)
        wide[self._wide_keep()] = self.values
        return wide[level:, :, :in_features].sum(dim=0).to(self.values.dtype)

    def unpack(self, level: int = 0) -> torch.Tensor:
        """The dequantized float32 weight of level `level`, its row gains applied."""
        level = self._index(level)
        weight = V.dequantize_dense(self.dense_grid(level), self.scales, self.dtype, self.group_size)
        return weight * self.gains[level].unsqueeze(1) if V.is_integer(self.dtype) else weight

    def level_sparsity(self, level: int) -> float:
        """Fraction of zeros at level `level`."""
        return 1.0 - float(self.level_mask(level).sum()) / (self.shape[0] * self.shape[1])

    def _index(self, level: int) -> int:
        if not 0 <= int(level) < self.n_levels:
            raise IndexError(f"level index {level} out of range for {self.n_levels} levels")
        return int(level)

    # --- storage ----------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The on-disk tensors: the lowest level in the base format, then codes, gains, shifts."""
        grid = self.dense_grid(0)
        stored = grid.to(torch.int8) if V.is_integer(self.dtype) else grid
        base_cls = BASE_FORMATS[self.base]
        layout = base_cls._layout(stored, self.dtype, **self.base_params)
        out = {name: layout[name] for name in base_cls.tensor_names}
        if self.scales is not None:
            out["scales"] = self.scales
        codes = self.codes()[grid.ne(0)]
        out["level_codes"] = pack_bitstream(codes.view(1, -1), code_width(self.n_levels)).view(-1)
        out["level_gains"] = self.gains
        if self.shifts is not None:
            out["level_shifts"] = self.shifts
        return out

    def meta(self) -> dict[str, Any]:
        body = super().meta()
        body.update(levels=list(self.levels), base=self.base, **self.base_params,
                    level_sparsity=[round(self.level_sparsity(i), 6) for i in range(self.n_levels)])
        return body

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> ElasticWeight:
        try:
            levels = check_levels(meta["levels"])
            base = meta["base"]
            base_cls = BASE_FORMATS[base]
        except (KeyError, TypeError, ValueError) as exc:
            raise LayoutMismatch(f"bad elastic metadata {meta!r}: {exc}") from None
        known = {*base_cls.tensor_names, "scales", *_LEVEL_TENSORS}
        if set(tensors) - known:
            raise LayoutMismatch(f"unexpected tensors {sorted(set(tensors) - known)}")
        base_meta = {**{k: meta.get(k) for k in ("dtype", "shape", "group_size")},
                     **{p: meta.get(p) for p in base_cls.params}, "format": base}
        packed = base_cls.from_tensors({k: v for k, v in tensors.items() if k not in _LEVEL_TENSORS}, base_meta)
        out_features = packed.shape[0]
        grid = packed.dense_grid()
        nonzero = grid.ne(0)
        count = int(nonzero.sum())
        width = code_width(len(levels))
        stream = tensors.get("level_codes")
        if stream is None or stream.dtype != torch.uint8 or tuple(stream.shape) != (math.ceil(count * width / 8),):
            raise LayoutMismatch(f"level_codes must be uint8 [{math.ceil(count * width / 8)}] ({count} non-zeros)")
        flat = unpack_bitstream(stream.view(1, -1), width, count).view(-1)
        if bool((flat >= len(levels)).any()):
            raise LayoutMismatch(f"level_codes name levels beyond the {len(levels)} stored")
        codes = torch.full(grid.shape, -1, dtype=torch.int64)
        codes[nonzero] = flat
        gains, shifts = tensors.get("level_gains"), tensors.get("level_shifts")
        expected = (len(levels), out_features)
        if gains is None or gains.dtype != torch.float32 or tuple(gains.shape) != expected:
            raise LayoutMismatch(f"level_gains must be float32 {list(expected)}")
        if not bool(torch.isfinite(gains).all() and (gains > 0).all()):
            raise LayoutMismatch("level_gains must be finite and > 0")
        if shifts is not None and (shifts.dtype != torch.float32 or tuple(shifts.shape) != expected
                                   or not bool(torch.isfinite(shifts).all())):
            raise LayoutMismatch(f"level_shifts must be finite float32 {list(expected)}")
        seg = segment_width(packed.shape[1], packed.group_size)
        return cls(shape=packed.shape, dtype=packed.dtype, scales=packed.scales, group_size=packed.group_size,
                   levels=levels, base=base, base_params={p: int(getattr(packed, p)) for p in base_cls.params},
                   seg=seg, gains=gains, shifts=shifts,
                   **_segment_layout(_runtime_values(grid, packed.dtype), codes, len(levels), seg))

    def _check(self) -> None:
        out_features = self.shape[0]
        self._expect("masks", torch.uint8, (self.n_levels, out_features, self.seg // 8))
        self._expect("offsets", torch.int64, (self.n_levels, out_features + 1))
        if int(self.offsets[:, -1].max()) > self.values.numel():
            raise LayoutMismatch("segment offsets run past the values")

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what the folder holds for this weight)."""
        cached = self.__dict__.get("_stored_nbytes")
        if cached is None:
            cached = sum(t.numel() * t.element_size() for t in self.tensors().values())
            self.__dict__["_stored_nbytes"] = cached
        return cached

    @property
    def resident_nbytes(self) -> int:
        """Bytes held in memory: masks, values, offsets, scales, gains and shifts."""
        held = [self.masks, self.values, self.offsets, self.gains, self.scales, self.shifts]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    @property
    def n_kept(self) -> int:
        return int(self.values.ne(0).sum())

    def __repr__(self) -> str:
        return (f"ElasticWeight(shape={self.shape}, dtype={self.dtype}, levels={list(self.levels)}, base={self.base}, "
                f"nbytes={self.nbytes})")


def segment_sums(packed: ElasticWeight) -> torch.Tensor:
    """int32 [L, out, groups]: sum of the stored integers of each segment and scale group of the layer's
    columns (one group without `group_size`). They do not depend on the level: the kernels' rowsums.

    Example:
        >>> w = torch.tensor([[3.0, -1.0, 2.0]])
        >>> p = ElasticWeight.pack(w, dtype="int8", keeps=[w != 0, w > 0], levels=[0.0, 0.3])
        >>> segment_sums(p).view(-1).tolist()
        [-42, 212]
    """
    out, in_features = packed.shape
    wide = torch.zeros(packed.n_levels, out, packed.seg, dtype=torch.int32)
    wide[packed._wide_keep()] = packed.values.to(torch.int32)
    wide = wide[:, :, :in_features]
    if packed.group_size is None:
        return wide.sum(dim=2, keepdim=True, dtype=torch.int32)
    groups = count_groups(in_features, packed.group_size)
    padded = torch.zeros(packed.n_levels, out, groups * packed.group_size, dtype=torch.int32)
    padded[:, :, :in_features] = wide
    return padded.view(packed.n_levels, out, groups, packed.group_size).sum(dim=3, dtype=torch.int32)


def level_scales(packed: ElasticWeight, level: int) -> torch.Tensor:
    """float32 [out, groups]: level `level`'s scales (row gains applied), the same for each of its segments
    ([out, 1] for one scale per row).

    Example:
        >>> w = torch.tensor([[3.0, -1.0, 2.0]])
        >>> p = ElasticWeight.pack(w, dtype="int8", keeps=[w != 0, w > 0], levels=[0.0, 0.3],
        ...                        gains=torch.tensor([[1.0], [2.0]]))
        >>> torch.allclose(level_scales(p, 1), torch.tensor([[2 * 3.0 / 127]]))
        True
    """
    assert packed.scales is not None
    out = packed.shape[0]
    groups = 1 if packed.group_size is None else count_groups(packed.shape[1], packed.group_size)
    scales = packed.scales.reshape(out, -1)[:, :groups]
    return (scales * packed.gains[level].unsqueeze(1)).contiguous()
