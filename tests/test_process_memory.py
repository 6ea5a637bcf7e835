"""A dropped model's memory goes back to the OS: glibc keeps a freed heap resident unless asked."""

from __future__ import annotations

import sys

import pytest
import torch

from difflora.models.process_memory import return_freed_memory

MIB = 2**20


def _resident_anonymous() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon"))
    return int(line.split()[1]) * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's heap")
def test_freed_heap_is_returned():
    big = torch.ones(8 * MIB // 4)
    del big  # glibc raises its mmap threshold past 8 MB: the 1 MB tensors below come from the heap
    return_freed_memory()  # earlier tests' free heap (this may be a pytest-xdist worker) is not counted
    start = _resident_anonymous()
    blocks = [torch.ones(MIB // 4) for _ in range(800)]
    del blocks[::2]  # 400 MB of 1 MB holes between tensors still in use, as a dropped model leaves them
    assert _resident_anonymous() - start > 750 * MIB  # free() cannot give back a hole by itself
    return_freed_memory()
    assert _resident_anonymous() - start < 450 * MIB
    del blocks
