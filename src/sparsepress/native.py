"""Loader of the compiled kernels `sparsepress._native`, and the switches that control it.

`SPARSEPRESS_DISABLE_NATIVE=1` makes the extension count as unavailable (everything runs the
pure-torch reference path). `SPARSEPRESS_ISA=scalar|avx2|avx2vnni|avx512|amx` (x86-64) or `scalar|neon|neondot`
(aarch64) forces an ISA level at load; it is an error when this CPU lacks that level.

Threads: parallel kernel calls run on torch's own OpenMP team when torch uses OpenMP (the default),
so our work lands on the threads torch already keeps spinning between its ops instead of competing
with them for the cores. `SPARSEPRESS_THREADS=own` keeps sparsepress's own thread pool instead.

Example:
    >>> from sparsepress import native
    >>> native.active_isa() in ISA_LEVELS + ("none",)
    True
"""

from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType

import torch

_BACKENDS = ("openmp", "own")
# Every kernel tree a build can have, lowest first per architecture (csrc/dispatch.cpp).
ISA_LEVELS = ("scalar", "avx2", "avx2vnni", "avx512", "amx", "neon", "neondot")


def _load() -> ModuleType | None:
    if os.environ.get("SPARSEPRESS_DISABLE_NATIVE", "") not in ("", "0"):
        return None
    try:
        from . import _native
    except ImportError:
        return None
    forced = os.environ.get("SPARSEPRESS_ISA", "")
    if forced:
        try:
            _native.set_isa(forced)
        except ValueError as exc:
            raise RuntimeError(f"SPARSEPRESS_ISA={forced!r}: {exc}") from None
    threads = os.environ.get("SPARSEPRESS_THREADS", "") or "openmp"
    if threads not in _BACKENDS:
        raise RuntimeError(f"SPARSEPRESS_THREADS={threads!r}: expected one of {', '.join(_BACKENDS)}")
    if threads == "openmp":
        _attach_host_openmp(_native)
    return _native


def host_openmp_library() -> str | None:
    """Path of the OpenMP runtime torch runs its intra-op work on, when torch uses one; else None.

    Only libraries already loaded in this process count (read from /proc/self/maps), preferring the
    copy shipped inside torch.

    Example:
        >>> path = host_openmp_library()
        >>> path is None or "omp" in Path(path).name
        True
    """
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    loaded = {line.split(maxsplit=5)[-1] for line in maps if "/" in line}
    runtimes = sorted(p for p in loaded if Path(p).name.startswith(("libgomp", "libiomp5")))
    torch_dir = str(Path(torch.__file__).resolve().parent)
    runtimes.sort(key=lambda p: not str(Path(p).resolve()).startswith(torch_dir))
    return runtimes[0] if runtimes else None


def _attach_host_openmp(lib: ModuleType) -> bool:
    path = host_openmp_library()
    return path is not None and lib.attach_openmp(path) == ""


_MODULE = _load()
# read on every kernel call, so kept here rather than asked of the extension each time
_BACKEND = [_MODULE.parallel_backend() if _MODULE is not None else "none"]


def module() -> ModuleType | None:
    """The loaded extension module, or None when it is missing or disabled.

    Example:
        >>> module() is None or hasattr(module(), "masked_linear")
        True
    """
    return _MODULE


def native_available() -> bool:
    """Whether the native kernels can be used in this process.

    Example:
        >>> isinstance(native_available(), bool)
        True
    """
    return _MODULE is not None


def active_isa() -> str:
    """The ISA level the kernels run at (one of ISA_LEVELS), or 'none' without the extension.

    Example:
        >>> active_isa() in ISA_LEVELS + ("none",)
        True
    """
    return _MODULE.active_isa() if _MODULE is not None else "none"


def supported_isas() -> list[str]:
    """ISA levels this CPU can run, lowest first; empty without the extension.

    Example:
        >>> supported_isas()[:1] in ([], ["scalar"])
        True
    """
    return list(_MODULE.supported_isas()) if _MODULE is not None else []


def set_isa(name: str) -> None:
    """Switch the process-wide ISA level (tests and benchmarks); ValueError if this CPU lacks it.

    Example:
        >>> if native_available(): set_isa(supported_isas()[-1])
    """
    if _MODULE is None:
        raise RuntimeError("the native extension sparsepress._native is not available")
    _MODULE.set_isa(name)


# Outputs of at least this many floats come from the extension's recycled blocks (see
# csrc/output_cache.h): a fresh multi-megabyte tensor costs a page fault per 4 KiB on its first write.
_RECYCLED_MIN_FLOATS = _MODULE.cached_output_min_bytes // 4 if _MODULE is not None else 0


def output_tensor(*shape: int) -> torch.Tensor:
    """An uninitialised float32 tensor for a kernel's output; large ones reuse memory already mapped.

    Big outputs (>= 256 KiB) are blocks that the extension takes back when their tensor dies and
    hands out again for the next output of about that size, so a forward pass does not fault fresh
    pages for every layer (~10% of a MiniLM batch-32 forward). Small ones come from torch.empty.

    Example:
        >>> output_tensor(512, 384).shape, output_tensor(2, 3).dtype
        (torch.Size([512, 384]), torch.float32)
    """
    count = 1
    for dim in shape:
        count *= dim
    if _MODULE is None or count < _RECYCLED_MIN_FLOATS:
        return torch.empty(shape, dtype=torch.float32)
    return _MODULE.output_tensor(shape)


def release_cached_outputs() -> int:
    """Frees the output blocks kept for reuse (at most 256 MiB are ever kept); returns the bytes freed.

    Example:
        >>> release_cached_outputs() >= 0
        True
    """
    return _MODULE.clear_output_cache() if _MODULE is not None else 0


def parallel_backend() -> str:
    """Which threads run parallel kernel calls: 'openmp' (torch's team), 'own' (our pool), or 'none'.

    Example:
        >>> parallel_backend() in ("openmp", "own", "none")
        True
    """
    return _BACKEND[0]


def set_parallel_backend(name: str) -> str:
    """Switch to 'openmp' (torch's OpenMP team, when torch has one) or 'own'; returns the one in use.

    Example:
        >>> previous = parallel_backend()
        >>> set_parallel_backend("own") in ("own", "none")
        True
        >>> _ = set_parallel_backend(previous) if previous != "none" else None
    """
    if name not in _BACKENDS:
        raise ValueError(f"parallel backend {name!r}: expected one of {', '.join(_BACKENDS)}")
    if _MODULE is None:
        return "none"
    _MODULE.detach_openmp()
    if name == "openmp":
        _attach_host_openmp(_MODULE)
    _BACKEND[0] = _MODULE.parallel_backend()
    return _BACKEND[0]
