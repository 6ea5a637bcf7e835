"""Replicas (issue 22): two real `difflora serve` processes over one adapter folder answer the same request
with the same PNG bytes, and an adapter retrained in place is picked up by both (each keys its cache by the
file's size and modification time), so a load balancer may send any request to any replica."""

from __future__ import annotations

import pytest

from difflora.formats.native import save_adapter
from tests.support.adapters import random_adapter
from tests.test_serve_shutdown import start_server, stop, wait_healthy


@pytest.mark.slow
def test_two_replicas_over_one_folder_serve_the_same_png(tmp_path):
    import httpx

    from difflora.models.loading import load_pipeline
    from tests.test_serve import free_port

    pipe = load_pipeline(None)
    folder = tmp_path / "adapters"
    folder.mkdir()
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    save_adapter(random_adapter(pipe, seed=1, unet=targets, name="style"), folder / "style.safetensors")
    servers = []
    try:
        for _ in range(2):
            port = free_port()
            server, log = start_server(tmp_path, port, "--adapter-dir", str(folder))
            servers.append((server, log, f"http://127.0.0.1:{port}"))
        for server, log, base in servers:
            wait_healthy(server, log, base)
        body = {"prompt": "a striped cat", "adapters": "style:0.8", "seed": 5, "steps": 1}

        def answers() -> list[bytes]:
            replies = [httpx.post(base + "/generate", json=body, timeout=120) for _, _, base in servers]
            assert all(reply.status_code == 200 for reply in replies), [r.text for r in replies]
            return [reply.content for reply in replies]

        first = answers()
        assert first[0] == first[1]
        # retrained in place (another adapter under the same name): both replicas read the new file
        save_adapter(random_adapter(pipe, seed=2, unet=targets, name="style"), folder / "style.safetensors")
        second = answers()
        assert second[0] == second[1] and second[0] != first[0]
    finally:
        for server, _, _ in servers:
            server.terminate()
        for server, _, _ in servers:
            try:
                server.wait(timeout=30)
            finally:
                stop(server)
