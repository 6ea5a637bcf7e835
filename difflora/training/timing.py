"""Where a run's wall time goes: model load, thread choice, caching, the steps, the sample grids, the
checkpoints and the final save. Told at the end of every run and written to `timing.json` in the run
directory, so a user sees what the previews and checkpoints cost without timing a second run to compare
(and `scripts/bench_train.py` reads the same figures)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from difflora.safe_io import write_atomic
from difflora.training.peak_memory import PeakMemory

# The phases in the order a run meets them; "other" is what no phase covers (optimizer set-up, logging).
PHASES = ("load", "threads", "caching", "steps", "validation", "previews", "checkpoints", "final_save")
_LABELS = {
    "load": "model load",
    "threads": "thread choice",
    "caching": "caching",
    "steps": "steps",
    "validation": "validation loss",
    "previews": "sample grids",
    "checkpoints": "checkpoints",
    "final_save": "final save",
}


@dataclass
class PhaseTimes:
    """Seconds per phase since `began` (a perf_counter value). Phases must not nest: each span of time is
    counted once. `memory` follows the peak memory phase by phase (difflora.training.memory)."""

    began: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    memory: PeakMemory = field(default_factory=PeakMemory)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.memory.start()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.memory.stop(name)

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def breakdown(self) -> dict[str, float]:
        """Every phase's seconds, "other" and "total" (seconds since `began`)."""
        total = self.elapsed()
        other = max(0.0, total - sum(self.seconds.values()))
        return {**self.seconds, "other": other, "total": total}

    def summary(self) -> str:
        """One line for the end of a run, e.g. "62.0 s: steps 51.3 s (83%), sample grids 4.1 s (7%), ...;
        peak memory 2.31 GiB RSS"."""
        values = self.breakdown()
        total = values.pop("total")
        shown = [(name, s) for name, s in values.items() if s >= 0.05]
        parts = [
            f"{_LABELS.get(name, name)} {s:.1f} s ({100 * s / max(total, 1e-9):.0f}%)" for name, s in shown
        ]
        return f"{total:.1f} s: " + ", ".join(parts) + "; " + self.memory.summary()

    def write(self, path: Path) -> Path:
        """Seconds per phase, "other" and "total", and the peaks in MiB under "peak_memory_mib"."""
        values: dict[str, object] = {name: round(s, 3) for name, s in self.breakdown().items()}
        values["peak_memory_mib"] = self.memory.record()
        return write_atomic(path, (json.dumps(values, indent=2) + "\n").encode())
