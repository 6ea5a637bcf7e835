"""Giving memory a dropped model held back to the operating system.

glibc's malloc serves most of a model's tensors (those under its mmap threshold, which rises to 32 MB after
the first large free) from its heap, and a freed heap is kept by the process, not returned: after a
full-size SDXL pipeline is dropped, 9 of its 14 GB stay resident. A process that trains and then
generates (the Python API, a notebook, the web UI) would hold both models' memory. `malloc_trim(0)`
returns every free heap page; it is glibc's own call for exactly this, so there is nothing to replace it
with in torch or the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from typing import Any


@functools.cache
def _malloc_trim() -> Any:  # the C function, or None where the C library has none
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # musl has none: AttributeError
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    """Collect unreachable objects (models sit in reference cycles: hooks, accelerate's wrappers), then give
    the free heap back to the OS where the C library allows it (glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
