"""The CPU thread probe runs once per machine and workload; later runs read its answer."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from difflora.training import threads as T

CPU = SimpleNamespace(device=torch.device("cpu"), num_processes=1)


@pytest.fixture
def unchosen(monkeypatch):
    """No thread count chosen by the user, on a machine of 2 cores, torch's count restored afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    monkeypatch.setattr(T.os, "cpu_count", lambda: 2)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_the_first_run_probes_and_later_runs_remember(unchosen, tmp_path, monkeypatch):
    memory = tmp_path / "cache" / T.MEMORY_FILE
    probes = []

    def probe():
        probes.append(1)
        return lambda: torch.ones(64, 64) @ torch.ones(64, 64)

    monkeypatch.setattr(T, "fastest", lambda forward, candidates: (forward(), (2, {2: 0.01, 1: 0.02}))[1])
    note, chosen = T.set_threads(None, CPU, probe, memory=memory, workload="tiny, batch 4, 64 px")
    assert probes == [1] and not chosen and "measured a denoiser forward" in note
    entry = json.loads(memory.read_text())[T.machine_key(2, "tiny, batch 4, 64 px")]
    assert entry["threads"] == 2 and entry["timings_ms"] == {"2": 10.0, "1": 20.0}

    def no_probe():
        raise AssertionError("probed again on the same machine and workload")

    torch.set_num_threads(2)
    note, chosen = T.set_threads(None, CPU, no_probe, memory=memory, workload="tiny, batch 4, 64 px")
    assert torch.get_num_threads() == entry["threads"] and not chosen
    assert "remembered in" in note and str(memory) in note

    torch.set_num_threads(2)
    T.set_threads(None, CPU, probe, memory=memory, workload="sdxl, batch 1, 1024 px")
    assert probes == [1, 1]  # another workload is measured on its own
    assert len(json.loads(memory.read_text())) == 2  # and kept beside the first


def test_a_busy_machine_s_answer_is_used_but_not_remembered(unchosen, tmp_path, monkeypatch):
    memory = tmp_path / T.MEMORY_FILE
    monkeypatch.setattr(T, "fastest", lambda forward, candidates: (1, {2: 0.4, 1: 0.01}))
    note, _ = T.set_threads(None, CPU, lambda: None, memory=memory, workload="w")
    assert "not remembered" in note and not memory.exists()


def test_a_damaged_memory_is_measured_again_and_rewritten(unchosen, tmp_path):
    memory = tmp_path / T.MEMORY_FILE
    memory.write_text('{"not": json')
    assert T.remembered(memory, "anything") is None
    T.remember(memory, "k", 2, {2: 0.01, 1: 0.02})
    assert T.remembered(memory, "k")["threads"] == 2
    memory.write_text(json.dumps({"k": {"threads": 0}}))  # not a thread count
    assert T.remembered(memory, "k") is None


def test_the_users_choice_needs_no_memory(unchosen, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    memory = tmp_path / T.MEMORY_FILE
    note, chosen = T.set_threads(None, CPU, lambda: pytest.fail("probed"), memory=memory, workload="w")
    assert chosen and "OMP_NUM_THREADS=1" in note and not memory.exists()


def test_the_key_names_the_machine():
    key = T.machine_key(2, "w")
    assert T.cpu_model() in key and "cores" in key and "2 per process" in key and key.endswith("| w")
