"""How many torch threads a CPU run uses: the user's choice, else a short probe, remembered per machine.

The probe times the denoiser's forward at each candidate thread count (1.6 s and 5.2 s of the demo's two
300-step runs on a 2-core machine: 2% and 8%). Its answer depends on the machine, the number of processes
sharing it and the model's architecture, so it is remembered in the cache folder under exactly those, and
only the first run on a machine pays. `--num-threads` or OMP_NUM_THREADS choose without a probe; deleting
the file (named in the plan) probes again. An answer of fewer threads than the process's share of the cores
means other work held them during the probe, a passing state: it is used for the run but not remembered.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch

from difflora.safe_io import write_atomic

MEMORY_FILE = "threads.json"


def machine_key(share: int, architecture: str) -> str:
    """CPU model and core count, cores per process, torch version and model architecture."""
    return f"{cpu_model()} | {os.cpu_count()} cores | {share} per process | torch {torch.__version__} | {architecture}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def remembered(memory: Path, key: str) -> dict[str, Any] | None:
    """The probe's earlier answer for `key` ({"threads", "timings_ms", "date"}), if any and well-formed."""
    try:
        entry = json.loads(memory.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None  # absent or damaged: probe again and rewrite it
    if isinstance(entry, dict) and isinstance(entry.get("threads"), int) and entry["threads"] >= 1:
        return entry
    return None


def remember(memory: Path, key: str, threads: int, timings: dict[int, float]) -> None:
    """Add `key`'s answer to the memory file, keeping other machines' and models' entries."""
    try:
        entries = json.loads(memory.read_text())
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    entries[key] = {
        "threads": threads,
        "timings_ms": {str(n): round(t * 1000, 1) for n, t in timings.items()},
        "date": date.today().isoformat(),
    }
    memory.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(memory, (json.dumps(entries, indent=1, sort_keys=True) + "\n").encode(), durable=False)


def fastest(forward: Callable[[], Any], candidates: Sequence[int]) -> tuple[int, dict[int, float]]:
    """The fastest thread count among `candidates` for `forward` (no grad), and each one's time.
    On a shared machine, threads that wait for a busy core can make every op many times slower than one
    thread alone (measured: 40x on 2 cores with one busy); on an idle machine more threads win."""
    timings: dict[int, float] = {}
    with torch.no_grad():
        for threads in candidates:
            torch.set_num_threads(threads)
            forward()  # warm-up: allocations, kernels
            runs = []
            for _ in range(2):
                began = time.perf_counter()
                forward()
                runs.append(time.perf_counter() - began)
            timings[threads] = min(runs)
    # Keep the most threads unless fewer are clearly faster (x1.5): a coin-flip between near-equal timings
    # would change the floating-point reduction order, and with it the exact numbers, from run to run.
    best = candidates[0]
    for threads in candidates[1:]:
        if timings[threads] * 1.5 < timings[best]:
            best = threads
    torch.set_num_threads(best)
    return best, timings


def chosen_by_user(share: int) -> str:
    """What set the thread count, when the user did: an environment variable torch reads at start-up, or
    torch.set_num_threads below this process's share of the cores (torch never starts below it unasked)."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(variable, "").strip():
            return f"{variable}={os.environ[variable].strip()}"
    if torch.get_num_threads() < share:
        return "torch.set_num_threads"
    return ""


def set_threads(
    threads: int | None,
    accelerator: Any,
    probe: Callable[[], Callable[[], Any]],
    *,
    memory: Path,
    workload: str,
) -> tuple[str, bool]:
    """Choose the CPU thread count: --num-threads, else the user's OMP_NUM_THREADS / MKL_NUM_THREADS or
    torch.set_num_threads, else what a probe found earlier on this machine for this `workload` (the model's
    architecture, batch and size), else a probe (`probe()` builds the forward it times), remembered in
    `memory`. Returns the plan's note and whether the user chose."""
    if accelerator.device.type != "cpu":
        return "", False
    if threads is not None:
        torch.set_num_threads(threads)
        return f"torch threads: {threads} (--num-threads)", True
    share = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    chosen = chosen_by_user(share)
    if chosen:
        return f"torch threads: {torch.get_num_threads()} ({chosen}; --num-threads overrides)", True
    if share == 1:
        torch.set_num_threads(1)
        return "torch threads: 1 (one core per process)", False
    key = machine_key(share, workload)
    earlier = remembered(memory, key)
    if earlier is not None:
        torch.set_num_threads(earlier["threads"])
        return (
            f"torch threads: {earlier['threads']} (measured on this machine on {earlier.get('date', '?')}, "
            f"remembered in {memory}; --num-threads chooses)",
            False,
        )
    best, timings = fastest(probe(), (share, 1))
    measured = ", ".join(f"{n}: {t * 1000:.0f} ms" for n, t in timings.items())
    if best < share:
        # Fewer threads win only while other work holds the cores: a passing state, so the next run
        # measures again rather than inheriting a slow choice for an idle machine.
        return f"torch threads: {best} (measured {measured}: the cores looked busy; not remembered)", False
    remember(memory, key, best, timings)
    return (
        f"torch threads: {best} (measured a denoiser forward with {measured}; --num-threads chooses)",
        False,
    )
