"""One training run at a time per output name and per cache folder, and no leftovers from killed runs.

`train()` holds `training_locks(run_paths(config))` around everything it does:

- `<output-dir>/<name>.lock`: a second `difflora train` writing the same adapter and run directory is
  refused, naming the PID of the first and the lock file;
- `<cache-dir>/difflora.lock`: so is a second run sharing the cache folder (pass it its own --cache-dir).

Both are released on exit, exceptions included; a lock left by a killed run is recognised as stale and
replaced with a note (difflora.locks). Once both are held, no other difflora process writes these folders,
so the temporary files a killed run left (`.<name>.<random>.tmp`: never read as real files, but dead
weight) are swept away. Under `accelerate launch` only the main process (RANK 0) takes the locks.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difflora.config.train import TrainConfig
from difflora.locks import hold_lock
from difflora.training.checkpoint import latest_checkpoint
from difflora.training.run import RunPaths

logger = logging.getLogger(__name__)

CACHE_LOCK = "difflora.lock"
CACHE_KINDS = ("latents", "text")  # the cache's entry folders (difflora.data.cache)


def run_paths(config: TrainConfig) -> RunPaths:
    """Where a run writes: the adapter, its run directory and the cache (the same rule as setup's)."""
    name = config.name or Path(config.data_dir).resolve().name
    return RunPaths.for_adapter(Path(config.output_dir), name, config.cache_dir)


def lock_path(paths: RunPaths) -> Path:
    return paths.adapter.with_suffix(".lock")


@contextmanager
def training_locks(paths: RunPaths) -> Iterator[None]:
    """Hold the run's and the cache's locks for the block (main process only), after sweeping the
    temporary files killed runs left in them."""
    if int(os.environ.get("RANK", "0")) != 0:  # the other processes of one run share the main one's locks
        yield
        return
    run_advice = "Wait for it to finish, or train under another --name (or --output-dir)."
    cache_advice = "Wait for it to finish, or give this run its own --cache-dir."
    with (
        hold_lock(lock_path(paths), what=f"Training run {paths.adapter}", advice=run_advice),
        hold_lock(paths.cache / CACHE_LOCK, what=f"Cache folder {paths.cache}", advice=cache_advice),
    ):
        removed = sweep_temporaries(paths)
        if removed:
            logger.info("removed %d temporary file(s) left by an interrupted run", removed)
        yield


def sweep_temporaries(paths: RunPaths) -> int:
    """Delete the temporary files and folders (`.*.tmp`) of earlier, interrupted writes: the adapter's in
    the output folder, those in the run directory and its subfolders (checkpoint staging folders, sample
    grids), and the cache's. Only where difflora writes, never a recursive search of a folder the user
    named (--cache-dir may be shared with other files). Only safe while holding both locks."""
    found = list(paths.adapter.parent.glob(f".{paths.adapter.name}.*.tmp"))
    found += [*paths.run_dir.glob(".*.tmp"), *paths.run_dir.glob("*/.*.tmp")]
    for kind in CACHE_KINDS:  # <cache>/<kind>/<key[:2]>/.<entry>.<random>.tmp
        found += (paths.cache / kind).glob("*/.*.tmp")
    for path in found:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return len(found)


def interrupted_message(paths: RunPaths) -> str:
    """What a Ctrl-C'd run leaves and how to go on (for the one line the CLI prints)."""
    last = latest_checkpoint(paths.checkpoints)
    if last is None:
        return (
            "Training interrupted before its first checkpoint: no adapter or checkpoint was written (the "
            "cached latents are kept). Run the same command again to start over."
        )
    return (
        f"Training interrupted. The newest checkpoint, {last.path} (step {last.step}), is complete: run the "
        "same command with --resume to continue from it."
    )
