"""`difflora serve`: one base model, many adapters, each request with exactly its own.

In-process tests drive the FastAPI app with TestClient on the embedded model and small synthetic adapters
(random A/B, written with save_adapter as tests/test_compose_exact.py does). The reference for every image
is `difflora.generate` itself, on a pipeline of its own: the server must answer, bit for bit, the pixels
and the `parameters` text that `difflora generate` writes for the same settings. One slow test starts the
real command (uvicorn) as a subprocess.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image

from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.config.generate import GenerateConfig
from difflora.config.serve import ServeConfig, is_loopback
from difflora.errors import ConfigError
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from difflora.serving.app import create_app
from difflora.serving.cache import AdapterCache, adapter_bytes
from difflora.serving.engine import Engine
from difflora.serving.metrics import Counter, Histogram, ServerMetrics
from tests.support.adapters import random_adapter
from tests.support.models import tiny_pipeline
from tests.support.paths import REPO_ROOT

PROMPT = "a striped cat"
STEPS = 2
NAMES = ("style", "subject", "detail", "extra")


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def png_parameters(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).info["parameters"]


@pytest.fixture(scope="module")
def embedded_pipe():
    from difflora.models.loading import load_pipeline

    return load_pipeline(None)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, embedded_pipe) -> Path:
    """Four small adapters for the embedded model, plus one recorded as made for another architecture."""
    directory = tmp_path_factory.mktemp("serve_adapters")
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    for seed, name in enumerate(NAMES, start=1):
        adapter = random_adapter(embedded_pipe, seed=seed, unet=targets, te=("q_proj", "v_proj"), name=name)
        save_adapter(adapter, directory / f"{name}.safetensors")
    foreign = random_adapter(embedded_pipe, seed=9, unet=("to_q",), name="sdxl_style")
    foreign.meta = AdapterMeta(
        name="sdxl_style", base_model="sdxl-base", base_architecture="sdxl-0123456789ab"
    )
    save_adapter(foreign, directory / "sdxl_style.safetensors")
    return directory


@pytest.fixture(scope="module")
def engine(embedded_pipe, adapter_dir) -> Engine:
    return Engine(embedded_pipe, adapter_dir=[str(adapter_dir)])


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def reference(adapter_dir, tmp_path_factory):
    """`difflora.generate` on a pipeline of its own: (spec, seed, fuse) -> (pixels, parameters text)."""
    from difflora.composition.composer import Composer
    from difflora.generation.generate import generate
    from difflora.models.loading import load_pipeline

    pipe = load_pipeline(None)
    out = tmp_path_factory.mktemp("reference")
    results: dict[tuple[str, int, bool], tuple[np.ndarray, str]] = {}

    def render(spec: str, seed: int, fuse: bool = True) -> tuple[np.ndarray, str]:
        key = (spec, seed, fuse)
        if key not in results:
            adapters = (spec,) if spec else ()
            config = GenerateConfig(prompt=PROMPT, adapters=adapters, adapter_dir=(str(adapter_dir),),
                                    seed=seed, steps=STEPS, fuse=fuse, out=str(out / f"{len(results)}"))  # fmt: skip
            path = generate(config, composer=Composer(pipe, "fused" if fuse else "dynamic"))[0]
            results[key] = (pixels(path.read_bytes()), png_parameters(path.read_bytes()))
        return results[key]

    return render


def ask(client, spec: str, seed: int, **extra) -> bytes:
    body = {"prompt": PROMPT, "adapters": spec, "seed": seed, "steps": STEPS, **extra}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return response.content


# ------------------------------------------------------------------------------------------- the images


def test_the_image_is_what_difflora_generate_writes_bit_for_bit(client, reference):
    spec = "style:0.7,subject:0.3:0.5"
    first = ask(client, spec, seed=3)
    want_pixels, want_parameters = reference(spec, 3)
    assert np.array_equal(pixels(first), want_pixels)
    assert png_parameters(first) == want_parameters
    assert "<lora:style:0.7> <lora:subject:0.3>" in want_parameters
    # other sets in between (and the same adapters in the other order) leave no trace on this one
    ask(client, "subject:0.3:0.5,style:0.7", seed=3)
    ask(client, "detail:-1,subject:0.3:0.5", seed=3)  # subject stays composed; style comes back after it
    assert np.array_equal(pixels(ask(client, spec, seed=3)), want_pixels)
    base_pixels, base_parameters = reference("", 3)
    no_adapters = ask(client, "", seed=3)
    assert np.array_equal(pixels(no_adapters), base_pixels) and png_parameters(no_adapters) == base_parameters
    assert not np.array_equal(base_pixels, want_pixels)


def test_json_answers_carry_the_same_pngs_and_parameters(client, reference):
    import base64

    body = {"prompt": PROMPT, "adapters": "style:0.5", "seed": 11, "steps": STEPS, "num_images": 2}
    answer = client.post("/generate", json={**body, "format": "json"}).json()
    assert answer["seeds"] == [11, 12] and answer["adapters"] == ["style:0.5"] and answer["mode"] == "fused"
    for png, parameters, seed in zip(answer["images"], answer["parameters"], answer["seeds"], strict=True):
        data = base64.b64decode(png)
        assert png_parameters(data) == parameters
        assert np.array_equal(pixels(data), reference("style:0.5", seed)[0])
    assert set(answer["timings"]) == {"queue", "compose", "render"}


def test_dynamic_mode_matches_generate_no_fuse(adapter_dir, reference):
    from difflora.models.loading import load_pipeline

    # a pipeline of its own: a pipeline has one Composer, and the module's engine holds a fused one
    dynamic = Engine(load_pipeline(None), adapter_dir=[str(adapter_dir)], mode="dynamic")
    with TestClient(create_app(dynamic)) as dynamic_client:
        got = ask(dynamic_client, "style:0.6,detail:0.4", seed=5)
        ask(dynamic_client, "subject:1", seed=5)
        again = ask(dynamic_client, "style:0.6,detail:0.4", seed=5)
        assert dynamic_client.get("/health").json()["mode"] == "dynamic"
    want_pixels, want_parameters = reference("style:0.6,detail:0.4", 5, fuse=False)
    assert np.array_equal(pixels(got), want_pixels) and png_parameters(got) == want_parameters
    assert np.array_equal(pixels(again), want_pixels)


def test_concurrent_requests_each_get_their_own_adapters(client, reference):
    specs = ["style:0.8", "subject:0.6,detail:0.4", "", "detail:-0.7,style:0.3"] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(lambda spec: ask(client, spec, seed=21), specs))
    for spec, answer in zip(specs, answers, strict=True):
        want_pixels, want_parameters = reference(spec, 21)
        assert np.array_equal(pixels(answer), want_pixels), spec
        assert png_parameters(answer) == want_parameters


# ------------------------------------------------------------------------------------------- the cache


def test_lru_eviction_under_a_small_cache_reloads_and_counts(embedded_pipe, adapter_dir):
    size = adapter_bytes(load_adapter(adapter_dir / "style.safetensors"))  # all four are the same size
    config = ServeConfig(adapter_dir=(str(adapter_dir),), cache_mb=2.5 * size / 2**20)  # room for two
    small = Engine.from_config(config, pipe=embedded_pipe)
    with TestClient(create_app(small)) as small_client:
        for spec in ("style", "subject", "detail", "style", "detail"):  # style is evicted, then read again
            ask(small_client, spec, seed=1, steps=1)
        stats = small.cache.stats()
        assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (1, 4, 2, 2)
        assert stats.nbytes <= stats.capacity
        listing = small_client.get("/adapters").json()
        assert [entry["name"] for entry in listing["cached"]] == ["style", "detail"]
        assert {e["name"] for e in listing["available"]} == {*NAMES, "sdxl_style"}
        metrics = small_client.get("/metrics").text
    assert "difflora_adapter_cache_evictions_total 2" in metrics
    assert (
        "difflora_adapter_cache_misses_total 4" in metrics
        and "difflora_adapter_cache_hits_total 1" in metrics
    )


def test_the_cache_keeps_the_most_recent_within_its_bytes_and_rereads_changed_files(tmp_path):
    reads: list[str] = []

    def load(name: str, path: Path) -> Adapter:
        reads.append(name)
        return Adapter({"unet.x": LoraWeights(torch.zeros(4, 16), torch.zeros(16, 4), 4.0)})

    files = {}
    for name in "abc":
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"x")
    size = adapter_bytes(load("probe", files["a"]))
    cache = AdapterCache(2 * size, load)
    for name in "abab":
        cache.get(name, files[name])
    cache.get("c", files["c"])  # evicts a (b was used last)
    assert [e.name for e in cache.cached()] == ["b", "c"] and cache.stats().evictions == 1
    files["b"].write_bytes(b"xy")  # retrained in place: read again, not served stale
    cache.get("b", files["b"])
    assert reads == ["probe", "a", "b", "c", "b"]
    assert AdapterCache(0, load).get("a", files["a"]).adapter is not None  # too big to keep: still served


# ------------------------------------------------------------------------------------------- bad requests


BAD_REQUESTS = [
    ({"adapters": "styel:0.5"}, 404, ["Unknown adapter 'styel'", "Closest: style"]),
    ({"adapters": "style:zero"}, 422, ["WEIGHT must be a number", "Grammar: NAME[:WEIGHT[:TE_WEIGHT]]"]),
    ({"adapters": "style,,subject"}, 422, ["Grammar:"]),
    ({"adapters": "sdxl_style"}, 409, ["sdxl-base (sdxl-0123456789ab)", "embedded tiny model (tiny-"]),
    ({"adapters": "../style"}, 422, ["not paths"]),
    ({"width": 2048}, 422, ["width 2048", "limit of 1024 (--max-size)"]),
    ({"steps": 500}, 422, ["steps 500", "limit of 50 (--max-steps)"]),
    ({"num_images": 9, "format": "json"}, 422, ["num_images 9", "--max-images"]),
    ({"num_images": 2}, 422, ['format "json"']),
    ({"width": 30}, 422, ["--width: must be a positive multiple of 8"]),
    ({"scheduler": "nope"}, 422, ["unknown 'nope'"]),
    ({"stepz": 4}, 422, ["unknown field 'stepz'"]),
    ({"steps": "many"}, 422, ["steps:"]),
]


@pytest.mark.parametrize(("extra", "status", "needles"), BAD_REQUESTS, ids=[str(b[0]) for b in BAD_REQUESTS])
def test_bad_requests_get_a_clear_json_error_and_leave_the_server_healthy(
    client, engine, extra, status, needles
):
    client.post("/generate", json={"prompt": PROMPT, "adapters": "detail:0.5", "steps": 1, "seed": 0})
    composed = engine.composer.adapters
    response = client.post("/generate", json={"prompt": PROMPT, **extra})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert all(needle in error for needle in needles), error
    assert engine.composer.adapters == composed  # refused before the model was touched
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"adapters": "style"}'])
def test_malformed_json_is_a_422_with_an_error_field(client, body):
    response = client.post("/generate", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["error"], response.text
    assert client.get("/health").status_code == 200


def test_a_body_sent_as_a_form_is_told_to_say_json(client):
    response = client.post(
        "/generate", content=b'{"prompt": "x"}', headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code == 422 and "Content-Type: application/json" in response.json()["error"]


def test_unknown_routes_negative_seeds_and_broken_files_answer_json_errors(client, embedded_pipe, tmp_path):
    missing = client.get("/nowhere")
    assert missing.status_code == 404 and "routes: POST /generate" in missing.json()["error"]
    assert client.get("/generate").status_code == 405 and client.get("/generate").json()["error"]
    negative = client.post("/generate", json={"prompt": PROMPT, "seed": -1})
    assert negative.status_code == 422 and "seed" in negative.json()["error"]
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with TestClient(create_app(Engine(embedded_pipe, adapter_dir=[str(tmp_path)]))) as other:
        broken = other.post("/generate", json={"prompt": PROMPT, "adapters": "broken", "steps": 1})
        assert broken.status_code == 500 and "broken.safetensors" in broken.json()["error"], broken.text
        assert other.get("/health").status_code == 200


def test_health_and_metrics_answer_while_a_request_holds_the_model(client, engine):
    with engine._lock:  # what a long render does
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/metrics").status_code == 200


def test_metrics_count_requests_by_status_and_expose_the_histograms(client):
    client.post("/generate", json={"prompt": PROMPT, "adapters": "nobody"})
    text = client.get("/metrics").text
    assert 'difflora_requests_total{route="/generate",status="404"}' in text
    assert "# TYPE difflora_request_duration_seconds histogram" in text
    assert "difflora_compose_duration_seconds_count" in text and "difflora_adapter_cache_bytes" in text
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert all(len(line.rsplit(" ", 1)) == 2 and float(line.rsplit(" ", 1)[1]) >= 0 for line in samples)


def test_histograms_are_cumulative_with_inf_sum_and_count():
    metrics = ServerMetrics()  # a registry of its own: the same names again do not collide
    histogram = Histogram("h", "help", metrics.registry, (1.0, 2.0), labels=("route",))
    counter = Counter("c_total", "help", metrics.registry, labels=("route", "status"))
    for value in (0.5, 1.0, 1.5, 9.0):
        histogram.observe(value, route="/x")
    counter.inc(route="/x", status="200")
    metrics.watch(lambda: [("g", "gauge", "help", 3)])
    text = metrics.exposition().decode()
    assert 'h_bucket{le="1.0",route="/x"} 2.0' in text and 'h_bucket{le="2.0",route="/x"} 3.0' in text
    assert 'h_bucket{le="+Inf",route="/x"} 4.0' in text and 'h_count{route="/x"} 4.0' in text
    assert 'h_sum{route="/x"} 12.0' in text and 'c_total{route="/x",status="200"} 1.0' in text
    assert "\ng 3.0\n" in text and "# TYPE g gauge" in text
    assert (
        histogram.count(route="/x"),
        histogram.total(route="/x"),
        counter.value(route="/x", status="200"),
    ) == (4, 12.0, 1.0)
    assert ServerMetrics().requests.value(route="/x", status="200") == 0  # nothing shared between registries


# ------------------------------------------------------------------------------------------- access


def test_a_token_is_required_on_every_route_but_health(engine):
    with TestClient(create_app(engine, token="s3cret")) as guarded:
        assert guarded.get("/health").status_code == 200
        for method, route in (("get", "/adapters"), ("get", "/metrics"), ("post", "/generate")):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                response = getattr(guarded, method)(route, headers=headers)
                assert response.status_code == 401, (route, headers)
                assert (
                    "Bearer" in response.json()["error"] and response.headers["www-authenticate"] == "Bearer"
                )
        assert guarded.get("/adapters", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_non_loopback_host_needs_a_token():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    with pytest.raises(ConfigError, match="0.0.0.0 is not a loopback address.*--token"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", token="x").token == "x"
    from difflora.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"], env={"DIFFLORA_SERVE_TOKEN": ""})
    assert result.exit_code == 2 and "--token" in result.output and "not a loopback" in result.output


def test_every_serve_config_field_is_a_flag_with_its_default_shown():
    import dataclasses

    import click

    from difflora.cli import cli
    from difflora.config import field_help
    from tests.support.cli import expected_default, help_lines

    options = {p.name: p for p in cli.commands["serve"].params if isinstance(p, click.Option)}
    assert set(options) - {"config_file", "help"} == {f.name for f in dataclasses.fields(ServeConfig)}
    lines = help_lines("serve")
    for field in dataclasses.fields(ServeConfig):
        assert options[field.name].default is None
        text = lines[options[field.name].opts[0]]
        expected = expected_default(field)
        assert text.startswith(field_help(ServeConfig)[field.name])
        assert (f"[default: {expected}]" in text) == (expected is not None), (field.name, text)


def test_importing_difflora_and_its_cli_loads_neither_torch_nor_fastapi():
    code = (
        "import sys, difflora, difflora.cli, difflora.cli.serve, difflora.config.serve; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'fastapi', 'uvicorn', 'pydantic'}))"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"


# ------------------------------------------------------------------------------------------- composer


def test_the_same_spec_composes_the_same_weights_whatever_came_before(tmp_path):
    from difflora.composition.composer import compose
    from difflora.config.spec import parse_adapter_weights
    from tests.support.adapters import write_sample_adapters

    pipe = tiny_pipeline(tmp_path)
    write_sample_adapters(pipe, tmp_path / "adapters")
    dirs = [tmp_path / "adapters"]
    spec = "style:0.7,detail:0.4,subject:0.3"
    fresh = compose(pipe, parse_adapter_weights(spec), adapter_dirs=dirs)
    want = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    budget = fresh._cache_left
    compose(pipe, parse_adapter_weights("detail:0.4"), adapter_dirs=dirs)
    composer = compose(pipe, parse_adapter_weights(spec), adapter_dirs=dirs)  # style now enters after detail
    # summed in another order, 14 of the UNet's tensors differ in their last bits (float addition)
    assert all(torch.equal(v, want[k]) for k, v in pipe.unet.state_dict().items())
    assert [entry.name for entry in composer.adapters] == ["style", "detail", "subject"]
    composer.clear()
    assert composer._cache_left >= budget  # removed adapters give their delta budget back


# ------------------------------------------------------------------------------------------- the real server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_the_command_serves_over_http_until_terminated(adapter_dir, tmp_path):
    import httpx

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "difflora",
        "serve",
        "--port",
        str(port),
        "--adapter-dir",
        str(adapter_dir),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    log = tmp_path / "server.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=output, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, log.read_text()
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "no /health within 120 s:\n" + log.read_text()
            time.sleep(0.5)
        body = {"prompt": PROMPT, "adapters": "style:0.5", "seed": 2, "steps": 1}
        response = httpx.post(base + "/generate", json=body, timeout=120)
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert "<lora:style:0.5>" in png_parameters(response.content)
        assert (
            httpx.post(base + "/generate", json={"prompt": "x", "adapters": "nope"}, timeout=30).status_code
            == 404
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert "Serving embedded tiny model" in log.read_text()
