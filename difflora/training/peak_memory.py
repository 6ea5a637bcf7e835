"""Peak memory per run, measured: the `time:` line and timing.json, beside the plan's estimate
(difflora.training.memory) so the two can be compared.

Measured: the process's peak resident set size (the kernel's high-water mark, VmHWM on Linux), and on CUDA
also `torch.cuda.max_memory_allocated`. The RSS mark cannot be reset cheaply, so per phase it is the mark
*after* the phase (the phase where it rose is the one that set it); CUDA's counter is reset at each phase's
start, so there each phase gets its own peak.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

MIB = 2**20


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (0 where the platform cannot say).

    On Linux the kernel's VmHWM: the peak of this process's own memory. `ru_maxrss` is not that: it starts
    at the parent's peak when a process is started (copied over fork, kept over exec) and takes in the
    peak at any thread's exit, so a run started from a large process, or after one, reported their peak."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: psutil (an accelerate dependency) reads the peak working set
        import psutil

        return int(getattr(psutil.Process().memory_info(), "peak_wset", 0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB, macOS bytes


def cuda_in_use(device: torch.device | None) -> bool:
    return device is not None and device.type == "cuda" and torch.cuda.is_available()


@dataclass
class PeakMemory:
    """The peaks seen so far; `device` decides whether CUDA's allocator is read as well."""

    device: torch.device | None = None
    after_phase_rss: dict[str, int] = field(default_factory=dict)  # phase -> RSS high-water mark after it
    phase_cuda: dict[str, int] = field(default_factory=dict)  # phase -> CUDA peak allocated during it
    cuda_outside: int = 0  # the CUDA peak between phases, folded in before each reset

    def start(self) -> None:
        if cuda_in_use(self.device):
            self.cuda_outside = max(self.cuda_outside, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self, phase: str) -> None:
        # the kernel updates VmHWM lazily (at unmaps, from per-thread counters), so a later reading can come
        # out a few pages lower: the run's mark is the highest seen so far
        self.after_phase_rss[phase] = max(peak_rss_bytes(), *self.after_phase_rss.values(), 0)
        if cuda_in_use(self.device):
            peak = torch.cuda.max_memory_allocated(self.device)
            self.phase_cuda[phase] = max(self.phase_cuda.get(phase, 0), peak)

    def cuda_peak(self) -> int | None:
        if not cuda_in_use(self.device):
            return None
        now = torch.cuda.max_memory_allocated(self.device)
        return max([self.cuda_outside, now, *self.phase_cuda.values()])

    def record(self) -> dict[str, object]:
        """What timing.json holds under "peak_memory_mib"."""
        values: dict[str, object] = {"rss": round(peak_rss_bytes() / MIB, 1)}
        cuda = self.cuda_peak()
        if cuda is not None:
            values["cuda_allocated"] = round(cuda / MIB, 1)
            values["cuda_allocated_per_phase"] = {k: round(v / MIB, 1) for k, v in self.phase_cuda.items()}
        values["rss_after_phase"] = {k: round(v / MIB, 1) for k, v in self.after_phase_rss.items()}
        return values

    def summary(self) -> str:
        """The `time:` line's memory part, e.g. "peak memory 2.31 GiB RSS, CUDA 0.81 GiB allocated"."""
        text = f"peak memory {peak_rss_bytes() / 2**30:.2f} GiB RSS"
        cuda = self.cuda_peak()
        return text + (f", CUDA {cuda / 2**30:.2f} GiB allocated" if cuda is not None else "")
