"""Fixtures only; the helpers they use live in tests/support/. Expensive artefacts (full-size checkpoints,
sample_data's latents, the README's sample adapters) are built once per session and shared."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.support.adapters import random_adapter
from tests.support.models import tiny_pipeline
from tests.support.paths import SAMPLE_DATA
from tests.support.scheduling import machine_shared, machine_to_itself, needs_whole_machine, schedule

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: each runs torch (and the CLI subprocesses it starts) on one thread; more
    # would oversubscribe the cores. Subprocesses read the variable; this process is told directly.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--kill-points",
        type=int,
        default=6,
        help="how many kill -9 points tests/test_faults_kill.py tries on a training run: the 4 named write "
        "windows, then seeded random times over the run (default 6; 20 for the full sweep)",
    )


@pytest.hookimpl(trylast=True)  # after pytest has grouped the tests by their session fixtures' params
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    schedule(items)


@pytest.fixture(autouse=True)
def _share_memory_between_workers(request, tmp_path_factory) -> Iterator[None]:
    """Under pytest-xdist, a test on the SDXL checkpoint has the machine to itself (tests/support/scheduling.py)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    folder = tmp_path_factory.getbasetemp().parent  # the session's folder, above every worker's own
    hold = machine_to_itself if needs_whole_machine(request.node) else machine_shared
    with hold(folder):
        yield


@pytest.fixture(autouse=True)
def _return_memory_after_slow_tests(request) -> Iterator[None]:
    """A slow test may load a full-size model in this process; the next one starts with that memory back
    with the OS (glibc would keep ~9 GB of a dropped SDXL, and two of those exhaust a 24 GB machine)."""
    yield
    if request.node.get_closest_marker("slow"):
        from difflora.models.process_memory import return_freed_memory

        return_freed_memory()


@pytest.fixture
def pipeline(tmp_path: Path):
    return tiny_pipeline(tmp_path)


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory) -> Path:
    """One latent and text-embedding cache for every training on sample_data in the session: the images are
    encoded once, not once per test module."""
    return tmp_path_factory.mktemp("sample_cache")


@pytest.fixture(scope="session")
def sample_adapters(tmp_path_factory) -> Path:
    """The README's `difflora train sample_data/style` and `difflora train sample_data/subject`, with their
    defaults on the embedded model (only the sample grids are off), trained once per test session and shared
    by the end-to-end tests: `<dir>/<concept>.safetensors` and its run directory `<dir>/<concept>.run/`.
    Their cache is their own, not sample_cache: a run on the tiny model is chaotic, and latents another
    test encoded in other batches differ in their last bits (up to 2.4e-6, measured), enough to move the
    signatures the end-to-end tests measure; so the trainings are the same whatever ran before them."""
    from click.testing import CliRunner

    from difflora.cli import cli

    out = tmp_path_factory.mktemp("sample_adapters")
    cache = tmp_path_factory.mktemp("sample_adapters_cache")
    for concept in ("style", "subject"):
        command = ["train", str(SAMPLE_DATA / concept), "--output-dir", str(out), "--sample-every", "0"]
        result = CliRunner().invoke(cli, [*command, "--cache-dir", str(cache)])
        assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="session")
def model_and_adapters(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny diffusers folder, and `style`/`subject` adapters made for it (in their own folder)."""
    from difflora.formats.native import save_adapter
    from difflora.models.loading import load_pipeline

    root = tmp_path_factory.mktemp("cli")
    tiny_pipeline(root).save_pretrained(root / "model")
    pipe = load_pipeline(root / "model")
    adapters = root / "adapters"
    save_adapter(
        random_adapter(pipe, seed=1, unet=("to_q", "to_v"), te=("q_proj",), scale=0.5, name="style"),
        adapters / "style.safetensors",
    )
    save_adapter(
        random_adapter(pipe, seed=2, unet=("to_k",), rank=2, scale=0.5), adapters / "subject.safetensors"
    )
    return root / "model", adapters


@pytest.fixture(scope="session")
def real_checkpoint(request) -> Iterator[Path]:
    """`<family>.safetensors`: the full-size random checkpoint of the family given by indirect
    parametrisation (sd1, sd2, sdxl), written once per session. pytest groups the tests of one family
    together and removes a file when the next family is asked for, so at most one (up to 7 GB) is on disk.
    It lives in a fresh /tmp folder: pytest keeps tmp_path folders, which must not keep gigabytes."""
    from tests.support.checkpoints import write_single_file

    _remove_checkpoints_of_ended_sessions()
    folder = Path(tempfile.mkdtemp(prefix=f"{CHECKPOINT_PREFIX}{os.getpid()}-", dir="/tmp"))
    try:
        path = folder / f"{request.param}.safetensors"
        write_single_file(path, request.param)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CHECKPOINT_PREFIX = "difflora-ckpt-"


def _remove_checkpoints_of_ended_sessions() -> None:
    """A session killed before its teardown leaves its checkpoint (up to 7 GB) in /tmp; the folder names the
    process that wrote it, so the next session removes those whose process is gone."""
    for folder in Path("/tmp").glob(f"{CHECKPOINT_PREFIX}*-*"):
        pid = folder.name.removeprefix(CHECKPOINT_PREFIX).split("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def chromium() -> Iterator:
    """One headless Debian Chromium per test process, driven by Playwright (tests/support/browser.py)."""
    from playwright.sync_api import sync_playwright

    from tests.support.browser import launch_chromium

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture
def ui_page(chromium) -> Iterator:
    """A fresh browser context (its own sessionStorage) and page, recording console and page errors."""
    from tests.support.browser import UiPage

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(60_000)
    yield UiPage(context.new_page()).watch()
    context.close()


@pytest.fixture
def live_server() -> Iterator:
    """A factory: live_server(engine, token=None, data_root=None) serves `engine` on a free loopback port
    (tests/support/browser.py's LiveServer); every server started is stopped after the test."""
    from tests.support.browser import start_server

    started = []

    def start(engine, **options):
        started.append(start_server(engine, **options))
        return started[-1]

    yield start
    for server in started:
        server.stop()
