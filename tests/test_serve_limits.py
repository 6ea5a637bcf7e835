"""Bad requests never cost the server (issue 22): every number a request carries is finite and in the range
config.limits declares (422 naming the field, the CLI refusing the same values in one line), prompts have a
length limit, bodies a size limit enforced before they are read whole (413), and an overflow in composing is
a 422 that leaves the model as it was.

The server runs in-process on the tiny pipeline (16 px images) with small random adapters. The body limit is
also driven through the ASGI interface directly, as uvicorn drives it, with a body produced chunk by chunk:
the test client would hold the whole body in memory first.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from difflora.adapter.types import LoraWeights
from difflora.config.generate import RANGES, GenerateConfig
from difflora.config.limits import MAX_PROMPT_CHARS, MAX_WEIGHT
from difflora.config.serve import ServeConfig
from difflora.errors import ConfigError
from difflora.formats.native import save_adapter
from difflora.serving.app import create_app
from difflora.serving.engine import Engine, Limits
from tests.support.adapters import random_adapter
from tests.support.models import tiny_pipeline

LIMIT = 64 * 1024  # ServeConfig.max_body_kb's default, in bytes
GOOD = {"prompt": "a striped cat", "steps": 1, "width": 16, "height": 16, "seed": 3}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, pipe) -> Path:
    """`style`, a small random adapter, and `huge`, whose update B·A is past float32's range (3.4e38)."""
    directory = tmp_path_factory.mktemp("limits_adapters")
    save_adapter(
        random_adapter(pipe, seed=1, unet=("to_q", "to_k"), name="style"), directory / "style.safetensors"
    )
    huge = random_adapter(pipe, seed=2, unet=("to_q",), rank=4, alpha=4.0, name="huge")
    huge.modules = {
        key: LoraWeights(torch.full_like(w.down, 1e19), torch.full_like(w.up, 1e19), w.alpha)
        for key, w in huge.modules.items()
    }  # each entry of B·A is 4 · 1e38: finite factors, an infinite product
    save_adapter(huge, directory / "huge.safetensors")
    return directory


@pytest.fixture(scope="module")
def engine(pipe, adapter_dir) -> Engine:
    return Engine(pipe, adapter_dir=[str(adapter_dir)], limits=Limits(max_size=64, max_steps=4, max_images=2))


@pytest.fixture(scope="module")
def client(engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine), raise_server_exceptions=False) as test_client:
        yield test_client


def rss_bytes(status: Path = Path("/proc/self/status")) -> int:
    """A process's resident set (this one's: the server's, in-process), from /proc."""
    lines = status.read_text().splitlines()
    return int(next(line for line in lines if line.startswith("VmRSS:")).split()[1]) * 1024


def post_raw(client: TestClient, body: bytes) -> tuple[int, str]:
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    return response.status_code, response.json()["error"]


# ------------------------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(
    ("adapters", "needles"),
    [
        ("style:1e308", ["WEIGHT must be between -100 and 100, got 1e+308"]),
        ("style:1:-1e308", ["TE_WEIGHT must be between -100 and 100"]),
        ("style:100.5", ["WEIGHT must be between -100 and 100, got 100.5"]),
        ("style:1e400", ["WEIGHT must be a finite number, got inf"]),
        ("style:1@out=1e308", ["factor '1e308' must be between -100 and 100"]),
    ],
)
def test_an_adapter_weight_past_the_bound_is_a_422_naming_the_field(client, engine, adapters, needles):
    status, error = post_raw(client, _json({**GOOD, "adapters": adapters}))
    assert status == 422 and all(needle in error for needle in needles), error
    assert error.startswith("Invalid generate configuration:\n  --adapters: Malformed "), error
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'"guidance": 1e400', "--guidance: must be a finite number, got inf"),
        (b'"guidance": Infinity', "--guidance: must be a finite number, got inf"),
        (b'"guidance": -Infinity', "--guidance: must be a finite number, got -inf"),
        (b'"guidance": NaN', "--guidance: must be a finite number, got nan"),
        (b'"guidance": 100.01', "--guidance: must be between 0 and 100, got 100.01"),
        (b'"steps": 1e400', "steps:"),
        (b'"seed": 9223372036854775808', "--seed: must be between 0 and 9223372036854775807"),
        (b'"width": ' + b"9" * 30, "--width: must be between 8 and 8192, got an integer of 100 bits"),
    ],
)
def test_a_number_out_of_range_or_not_finite_is_a_422_naming_the_field(client, body, needle):
    status, error = post_raw(client, b'{"prompt": "a cat", ' + body + b"}")
    assert status == 422 and needle in error, error


def test_every_range_is_enforced_at_its_bounds_and_shown_in_the_help():
    from difflora.config import field_help

    helps = field_help(GenerateConfig)
    base = {"prompt": "x"}
    for name, (low, high) in RANGES.items():
        for value in (low, high):
            assert getattr(GenerateConfig(**base, **{name: value}), name) == value
        past = [low - 1, high + 1] if isinstance(high, int) else [low - 0.5, high + 0.5]
        for value in [*past, float("inf"), float("nan")]:
            with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')}: must be"):
                GenerateConfig(**base, **{name: value})
        shown = "2^63-1" if high == 2**63 - 1 else f"{high:g}"
        assert shown in helps[name].replace("±", ""), (name, helps[name])
    assert f"±{MAX_WEIGHT:g}" in helps["adapters"] and f"{MAX_PROMPT_CHARS} characters" in helps["prompt"]


def test_the_cli_refuses_the_same_values_in_one_line(tmp_path):
    from click.testing import CliRunner

    from difflora.cli import cli

    for flags, needle in (
        (["--guidance", "inf"], "--guidance: must be a finite number, got inf"),
        (["--adapters", "style:1e308"], "WEIGHT must be between -100 and 100"),
        (["--steps", "1001"], "--steps: must be between 1 and 1000, got 1001"),
        (["--sweep", "style:0,1e308"], "within ±100"),
    ):
        result = CliRunner().invoke(cli, ["generate", "a cat", "--out", str(tmp_path), *flags])
        assert result.exit_code == 2 and needle in result.output, result.output
        assert "Traceback" not in result.output


def test_serve_limits_stay_within_what_any_request_may_ask():
    with pytest.raises(ConfigError, match="--max-steps: must be between 1 and 1000, got 5000"):
        ServeConfig(max_steps=5000)
    with pytest.raises(ConfigError, match="--max-body-kb: must be at least 1"):
        ServeConfig(max_body_kb=0)
    assert ServeConfig(max_size=8192, max_images=1000).max_size == 8192


def test_the_data_root_must_be_an_existing_folder(tmp_path):
    with pytest.raises(ConfigError, match="--data-root: .*missing is not a folder"):
        ServeConfig(data_root=str(tmp_path / "missing"))
    assert ServeConfig(data_root=str(tmp_path)).data_root == str(tmp_path)


# ------------------------------------------------------------------------------------------- texts and bodies


def test_a_5_mb_prompt_is_refused_in_under_a_second_and_a_long_one_by_its_length(client):
    start = time.perf_counter()
    response = client.post("/generate", json={**GOOD, "prompt": "cat " * (5 * 2**20 // 4)})
    assert time.perf_counter() - start < 1.0
    assert response.status_code == 413 and "limit of 65536 bytes (--max-body-kb" in response.json()["error"]
    for field in ("prompt", "negative_prompt"):
        start = time.perf_counter()
        status, error = post_raw(client, _json({**GOOD, field: "x" * (MAX_PROMPT_CHARS + 1)}))
        assert time.perf_counter() - start < 1.0
        assert status == 422 and f"--{field.replace('_', '-')}: 4001 characters; at most 4000" in error, error
    longest = {**GOOD, "prompt": "é" * MAX_PROMPT_CHARS, "negative_prompt": "\x01" * MAX_PROMPT_CHARS}
    assert len(_json(longest, ensure_ascii=True)) < LIMIT  # the largest valid request fits the default limit
    assert client.post("/generate", json=longest).status_code == 200


def test_the_body_limit_answers_413_json_under_the_token_check_and_is_counted(engine):
    refused = 'difflora_requests_total{route="/generate",status="413"} '
    with TestClient(create_app(engine, token="t", max_body_bytes=100)) as small:
        counted = _counter(small.get("/metrics", headers={"Authorization": "Bearer t"}).text, refused)
        big = _json({**GOOD, "prompt": "x" * 200})
        assert small.post("/generate", content=big).status_code == 401  # no token: nothing about the body
        headers = {"Authorization": "Bearer t", "content-type": "application/json"}
        response = small.post("/generate", content=big, headers=headers)
        assert response.status_code == 413 and response.headers["connection"] == "close"
        assert "limit of 100 bytes" in response.json()["error"]
        chunked = small.post("/generate", content=iter([big[:60], big[60:]]), headers=headers)
        assert chunked.status_code == 413 and "went past that" in chunked.json()["error"]
        assert small.post("/generate", content=_json(GOOD), headers=headers).status_code == 200
        metrics = small.get("/metrics", headers=headers).text
    assert _counter(metrics, refused) == counted + 2  # the engine's metrics: shared with other tests


def _counter(text: str, prefix: str) -> int:  # prometheus_client writes every value as a float
    return next(
        (int(float(line.removeprefix(prefix))) for line in text.splitlines() if line.startswith(prefix)), 0
    )


def asgi_post(app, chunks: Iterator[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, int]:
    """POST /generate to the ASGI `app` as uvicorn would, the body pulled chunk by chunk from `chunks`:
    (status, response body, bytes of the request body the app pulled)."""
    pulled, answer = 0, {"status": 0, "body": b""}
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/generate", "raw_path": b"/generate", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}  # fmt: skip

    upcoming = next(chunks, None)

    async def receive():
        nonlocal pulled, upcoming
        if upcoming is None:  # the whole body was read: the client waits for its answer
            await asyncio.sleep(3600)
        chunk, upcoming = upcoming, next(chunks, None)
        pulled += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": upcoming is not None}

    async def send(message):
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    asyncio.run(asyncio.wait_for(app(scope, receive, send), timeout=30))
    return answer["status"], answer["body"], pulled


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_50_mb_body_is_a_413_read_at_most_to_the_limit_with_rss_flat(engine, declared):
    app, chunk, size = create_app(engine), b"x" * 65536, 50 * 2**20
    headers = [(b"content-length", str(size).encode())] if declared else []
    asgi_post(app, iter([_json(GOOD)]), [])  # the app's first request builds its middleware stack
    before = rss_bytes()
    status, body, pulled = asgi_post(app, (chunk for _ in range(size // len(chunk))), headers)
    grown = rss_bytes() - before
    assert status == 413 and b"--max-body-kb" in body
    assert pulled == (0 if declared else 2 * len(chunk))  # the first chunk fits 64 KiB, the second does not
    assert grown < 20 * 2**20, f"RSS grew {grown / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------- composing


def test_an_overflow_in_composing_is_a_422_and_the_next_request_gets_the_same_png(client, engine, pipe):
    before = client.post("/generate", json={**GOOD, "adapters": "style:0.5"})
    assert before.status_code == 200
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    response = client.post("/generate", json={**GOOD, "adapters": "style:0.5,huge:1"})
    error = response.json()["error"]
    assert response.status_code == 422, error
    assert "Composing style:0.5, huge:1 overflows float32 in unet module" in error and "to_q" in error
    assert "lower the weights (nothing is composed now)" in error
    assert engine.composer.adapters == [] and all(
        torch.isfinite(v).all() for v in pipe.unet.state_dict().values()
    )
    after = client.post("/generate", json={**GOOD, "adapters": "style:0.5"})
    assert after.status_code == 200 and after.content == before.content  # the PNG's bytes, parameters and all
    assert all(torch.equal(v, state[k]) for k, v in pipe.unet.state_dict().items())
    Image.open(io.BytesIO(after.content)).verify()


def _json(body: dict, *, ensure_ascii: bool = False) -> bytes:
    import json

    return json.dumps(body, ensure_ascii=ensure_ascii).encode()


def test_the_readme_states_the_ranges_config_declares():
    from difflora.config import limits

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Serving") : readme.index("## Python API")]
    for text in (
        f"finite, -{limits.MAX_WEIGHT:g} to {limits.MAX_WEIGHT:g}",
        f"finite, 0 to {limits.MAX_GUIDANCE:g}",
        f"1 to {limits.MAX_STEPS}, and at most `--max-steps` ({ServeConfig.max_steps})",
        f"from 8 to {limits.MAX_SIZE}, and at most `--max-size` ({ServeConfig.max_size})",
        f"1 to {limits.MAX_IMAGES}, and at most `--max-images` ({ServeConfig.max_images})",
        f"at most {limits.MAX_PROMPT_CHARS} characters",
        f"`--max-body-kb` ({ServeConfig.max_body_kb} KiB",
    ):
        assert text in section, text
    assert limits.MAX_SEED == 2**63 - 1 and "0 to 2^63-1" in section


# ------------------------------------------------------------------------------------------- the real server


def _send_until_answered(port: int, head: bytes, chunks: Iterator[bytes]) -> tuple[bytes, int]:
    """Send `head`, then `chunks` until the server answers; (the answer, body bytes sent)."""
    import select
    import socket

    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        connection.sendall(head)
        for chunk in chunks:
            if select.select([connection], [], [], 0)[0]:
                break
            try:
                connection.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        answer = b""
        try:
            while part := connection.recv(65536):
                answer += part
        except (ConnectionResetError, TimeoutError):
            pass
    return answer, sent


@pytest.mark.slow
def test_the_real_server_answers_50_mb_bodies_413_with_its_rss_flat(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    import httpx

    from tests.support.paths import REPO_ROOT

    with socket.socket() as probe:  # a free port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    with open(log, "wb") as output:
        server = subprocess.Popen([sys.executable, "-m", "difflora", "serve", "--port", str(port)], cwd=tmp_path,
                                  env=env, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    status_file = Path(f"/proc/{server.pid}/status")
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        httpx.post(
            f"http://127.0.0.1:{port}/generate", json={"prompt": "x", "steps": 1, "seed": 1}, timeout=60
        )
        before, chunk, size = rss_bytes(status_file), b"x" * 65536, 50 * 2**20
        head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        for framing in (f"Content-Length: {size}\r\n\r\n".encode(), b"Transfer-Encoding: chunked\r\n\r\n"):
            chunked = framing.startswith(b"Transfer")
            frame = (b"10000\r\n" + chunk + b"\r\n") if chunked else chunk
            answer, sent = _send_until_answered(
                port, head + framing, (frame for _ in range(size // len(chunk)))
            )
            assert answer.startswith(b"HTTP/1.1 413") and b"--max-body-kb" in answer, answer[:300]
            assert sent < size // 2, sent  # answered long before the client was done
        grown = rss_bytes(status_file) - before
        assert grown < 20 * 2**20, f"the server's RSS grew {grown / 2**20:.1f} MiB"
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json()["status"] == "ok"
    finally:
        server.terminate()
        server.wait(timeout=30)
