"""Loader of the compiled kernels `sparsepress._native`, and the switches that control it.

`SPARSEPRESS_DISABLE_NATIVE=1` makes the extension count as unavailable (everything runs the
pure-torch reference path). `SPARSEPRESS_ISA=scalar|avx2|avx512` forces an ISA level at load; it is
an error when this CPU lacks that level.

Example:
    >>> from sparsepress import native
    >>> native.active_isa() in ("scalar", "avx2", "avx512", "none")
    True
"""

from __future__ import annotations

import os
from types import ModuleType


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
    return _native


_MODULE = _load()


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
    """The ISA level the kernels run at: 'avx512', 'avx2', 'scalar', or 'none' without the extension.

    Example:
        >>> active_isa() in ("scalar", "avx2", "avx512", "none")
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
