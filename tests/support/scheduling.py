"""How the suite is split across pytest-xdist workers (`-n auto --dist loadgroup` in pyproject).

Each test module is one unit of work, so its module-scoped fixtures are built once. Two kinds of module
are merged into one unit:

- the full-size ones (and any module asking for `real_checkpoint`): they write multi-gigabyte random checkpoints (the session's `real_checkpoint`) and
  train at full width, SDXL near this machine's whole memory, so two of them must never run at once;
- the users of the session's `sample_adapters` (the README's two trainings): on one worker they are
  trained once, not once per worker.

Units are handed out in the order of `order_key`: longest first, so that the full-size unit (about a third
of the whole suite) does not start last and leave one worker idle at the end.

Memory: a test on the full-size SDXL checkpoint takes up to ~20 of this machine's 23 GB, so while one runs
no other test may run beside it (`machine_to_itself`); every other test shares the machine
(`machine_shared`), the unit's other full-size tests included: they peak at 10 GB or less, and the other
worker's tests at a few GB. Two file locks make that a readers-writer lock between the workers: `memory.lock`
(shared by ordinary tests, exclusive for an SDXL one) and a `gate` an SDXL test holds while it waits, so
that the other worker, which starts a test every few seconds, cannot keep the shared lock held forever.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FULL_SIZE = "full-size"
FULL_SIZE_MODULES = frozenset({"test_real_models", "test_models_single_file", "test_flux_real"})
SAMPLE_ADAPTERS = "sample-adapters"
SAMPLE_ADAPTER_MODULES = frozenset({"test_trainer_learning", "test_compose_signatures"})


def module_of(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid


def group_of(item: pytest.Item, checkpoint_modules: frozenset[str] = frozenset()) -> str:
    module = module_of(item)
    if module in FULL_SIZE_MODULES or module in checkpoint_modules:
        return FULL_SIZE
    if module in SAMPLE_ADAPTER_MODULES:
        return SAMPLE_ADAPTERS
    return module


def order_key(group: str, has_slow: bool) -> int:
    """0 first: the full-size unit, then units with slow tests, then the fast ones."""
    if group == FULL_SIZE:
        return 0
    return 1 if has_slow else 2


def schedule(items: list[pytest.Item]) -> None:
    """Mark every item with its xdist group and sort the items (stably) so the costly units come first."""
    # a module asking for the session's full-size checkpoint joins the full-size unit: one file written
    checkpoint_modules = frozenset(module_of(i) for i in items if "real_checkpoint" in i.fixturenames)
    groups = {item.nodeid: group_of(item, checkpoint_modules) for item in items}
    slow_groups = {groups[item.nodeid] for item in items if item.get_closest_marker("slow")}
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=lambda item: order_key(groups[item.nodeid], groups[item.nodeid] in slow_groups))


# Peak memory of each full-size test, measured in one process on this machine (2026-12-06, the process and
# its children, fixtures included): on the SDXL checkpoint 20.2 GB (train, generate, export) and 13.8 GB
# (load); SD 1.5 6.3-8.2 GB, SD 2.1 8.6 GB, Flux.1 at full width 8.5-10.3 GB, the unit's other tests < 4 GB.
WHOLE_MACHINE_CHECKPOINTS = frozenset({"sdxl"})


def needs_whole_machine(item: pytest.Item) -> bool:
    """A test on a checkpoint too large to share the machine with another test."""
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("real_checkpoint") in WHOLE_MACHINE_CHECKPOINTS


@contextmanager
def _locked(path: Path, kind: int) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, kind)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextmanager
def machine_to_itself(folder: Path) -> Iterator[None]:
    """Held while a full-size test runs: it starts once the other worker's test is done, and no test
    starts beside it."""
    with _locked(folder / "gate", fcntl.LOCK_EX), _locked(folder / "memory.lock", fcntl.LOCK_EX):
        yield


@contextmanager
def machine_shared(folder: Path) -> Iterator[None]:
    """Held while any other test runs: it waits while a full-size test runs or waits to run."""
    with _locked(folder / "gate", fcntl.LOCK_SH):
        pass
    with _locked(folder / "memory.lock", fcntl.LOCK_SH):
        yield
