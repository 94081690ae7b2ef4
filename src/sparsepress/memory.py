"""Give back the memory of weights that are no longer needed, including memory-mapped file pages.

transformers loads safetensors weights as read-only memory maps: a dense weight's pages stay resident
(and counted in RSS) for as long as the file stays mapped, even after its tensor is freed, because the
other weights keep the mapping alive. After a block's Linear layers are packed, their old pages are
dropped with madvise(MADV_DONTNEED); they would be re-read from the file if ever touched again.
Anonymous (ordinary) memory is never advised: only pages of file-backed mappings are.

Example:
    >>> import torch
    >>> release_file_pages([torch.zeros(4)])  # anonymous memory: left alone
    0
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Iterable

import torch

_MADV_DONTNEED = 4


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings backed by a regular file (Linux /proc/self/maps)."""
    spans = []
    try:
        with open("/proc/self/maps", encoding="utf-8") as handle:
            for line in handle:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].startswith("/") and not parts[5].startswith("/dev/"):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    spans.append((start, end))
    except OSError:
        return []
    return spans


def release_file_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Drop resident pages of file-backed tensors the caller no longer needs; returns bytes advised.

    Only whole pages inside both the tensor's storage and a file-backed mapping are advised, so no
    other data shares them; their content is the file's, which is what a re-read would give.
    """
    if not sys.platform.startswith("linux"):
        return 0
    spans = _file_mappings()
    if not spans:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    released = 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or tensor.device.type != "cpu":
            continue
        for span_start, span_end in spans:
            if span_start <= start < span_end:
                low = -(-start // page) * page
                high = (min(start + size, span_end) // page) * page
                if high > low and libc.madvise(ctypes.c_void_p(low), ctypes.c_size_t(high - low), _MADV_DONTNEED) == 0:
                    released += high - low
                break
    return released


def trim_heap() -> bool:
    """Return freed heap memory to the OS (glibc `malloc_trim`); False where that is not available.

    Large temporaries (dense copies, Hessians) freed after a block otherwise stay in malloc's arenas
    and RSS grows block after block.

    Example:
        >>> isinstance(trim_heap(), bool)
        True
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
