"""Peak memory: the RSS high-water mark against the kernel's own VmHWM, a phase that allocates raising it,
and CUDA's per-phase peaks folded into the run's (with a scripted allocator counter). The plan's estimate
is tests/test_memory_estimate.py's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from difflora.training import peak_memory
from difflora.training.peak_memory import MIB, PeakMemory, peak_rss_bytes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/self/status")


def test_peak_rss_is_the_kernels_high_water_mark():
    # on Linux the mark is VmHWM itself, read twice: equal to within what the interpreter touched between
    assert abs(peak_rss_bytes() - _status_kib("VmHWM") * 1024) < MIB


_PHASE_THAT_ALLOCATES = """
import json
from pathlib import Path

import numpy as np

from difflora.training.peak_memory import MIB, peak_rss_bytes
from difflora.training.timing import PhaseTimes

Path("/proc/self/clear_refs").write_text("5")  # the mark starts at today's resident size, not the imports' peak
times = PhaseTimes()
mark = peak_rss_bytes()
with times.phase("caching"):
    block = np.ones(96 * MIB, dtype=np.uint8)  # touched: anonymous and resident (no swap can take it)
    assert block[-1] == 1
del block
with times.phase("steps"):
    pass
print(json.dumps({"mark": mark, "after": times.memory.after_phase_rss, "record": times.memory.record(),
                  "summary": times.summary(), "peak": peak_rss_bytes()}))
"""


def test_a_phase_that_allocates_raises_the_mark_after_it():
    # In its own interpreter: in a test worker, the resident size also holds file pages (a model's mapped
    # weights) that the kernel may reclaim while another test needs the memory, and other threads free and
    # allocate; either can take more than the block adds between the two readings (a CI run saw it).
    import json
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _PHASE_THAT_ALLOCATES], capture_output=True, text=True, check=True
    )
    seen = json.loads(run.stdout)
    after, mark, record = seen["after"], seen["mark"], seen["record"]
    assert after["caching"] >= mark + 64 * MIB and after["steps"] == after["caching"]
    assert record["rss"] * MIB >= after["caching"] - MIB and "cuda_allocated" not in record
    assert seen["summary"].endswith(f"peak memory {seen['peak'] / 2**30:.2f} GiB RSS")


def test_cuda_peaks_per_phase_and_between_phases(monkeypatch):
    """A scripted allocator: the counter's values as the run reads them, and resets that zero it."""
    counter = {"peak": 0}
    monkeypatch.setattr(peak_memory, "cuda_in_use", lambda device: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: counter["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: counter.update(peak=0))
    peaks = PeakMemory(torch.device("cuda", 0))
    counter["peak"] = 300 * MIB  # before any phase (e.g. the model moved to the GPU)
    peaks.start()
    counter["peak"] = 100 * MIB
    peaks.stop("load")
    peaks.start()
    counter["peak"] = 700 * MIB
    peaks.stop("steps")
    counter["peak"] = 500 * MIB  # between phases, read at the next start
    peaks.start()
    counter["peak"] = 50 * MIB
    peaks.stop("final_save")
    assert peaks.phase_cuda == {"load": 100 * MIB, "steps": 700 * MIB, "final_save": 50 * MIB}
    assert peaks.cuda_peak() == 700 * MIB
    record = peaks.record()
    assert record["cuda_allocated"] == 700.0 and record["cuda_allocated_per_phase"]["load"] == 100.0
    assert peaks.summary().endswith(", CUDA 0.68 GiB allocated")


def test_a_process_started_from_a_large_one_reports_its_own_peak():
    """ru_maxrss starts at the parent's peak (copied over fork, kept over exec): a run started from a large
    process (a notebook, a test worker) would report that process's peak as its own."""
    import subprocess
    import sys

    block = np.ones(600 * MIB, dtype=np.uint8)  # touched: the parent is 600 MB larger than the child needs
    child = "from difflora.training.peak_memory import peak_rss_bytes; print(peak_rss_bytes())"
    output = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
    parent = _status_kib("VmRSS") * 1024
    del block
    assert int(output) < parent - 300 * MIB  # the child imported torch: far below the parent with its block
