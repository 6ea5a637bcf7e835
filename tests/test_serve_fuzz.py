"""Seeded fuzzing of the HTTP API of `difflora serve`, the way tests/test_fuzz.py fuzzes the CLI's inputs:
every case ends in a 4xx JSON error whose `error` says something, or a valid image; never a 5xx, never a
hang (each case is timed). /health stays ok throughout and the process's resident memory stays flat.

The generator builds JSON bodies from valid values and hostile ones in every field (every JSON type, huge
and non-finite numbers written as JSON's `1e400`, `Infinity` and `NaN`, long and odd strings, malformed
adapter specs, unknown fields), and mixes in raw bodies: broken JSON, deep nesting, wrong content types and
bodies over the size limit. The server is the tiny pipeline (16 px) with limits of 16 px, 1 step and 2
images, so that the cases which do render stay cheap; most (374 of 400) are refused before the model runs.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from difflora.adapter.types import LoraWeights
from difflora.formats.native import save_adapter
from difflora.serving.app import create_app
from difflora.serving.engine import Engine, Limits
from tests.support.adapters import random_adapter
from tests.support.models import tiny_pipeline

SEED = 2222
CASES = 400
# Far above any honest case: a refusal takes milliseconds (a 5 MB prompt took 11.6 s to tokenise before it was
# refused by length), a render ~0.2 s, or 3.5 s with the CPU shared with a test suite at a lower priority.
REFUSAL_SECONDS = 2.0
RENDER_SECONDS = 15.0
RSS_GROWTH_BYTES = 48 * 2**20  # after a warm-up; what a leak of bodies (64 KiB to 5 MB each) would exceed
BODY_LIMIT = 8 * 1024  # a small limit, so that the oversize cases cost little to build

_SPEC_PIECES = [*"sty:le,.@=-+e0123456789 \\/_", "style", "detail", "huge", "te=", "nan", "inf", "1e308",
                "1e400", "out=", "in04", "C:", "../", "é", "\x00"]  # fmt: skip
_STRINGS = ["", " ", "a cat", "\x00", "é" * 50, "x" * 5000, "a" * 4001, "<lora:x:1>", "\n", "\ud800"]
_NUMBERS = [0, 1, 2, 3, 16, -1, 8, 30, 2**31, 2**63, 2**64, 10**30, 1.5, -0.0, 1e308, 1e-320, 100.5]
_SPECIALS = ["1e400", "-1e400", "Infinity", "-Infinity", "NaN", "1" * 300, "1e99999", "-0"]
_CHOICES = {
    "prompt": ["a striped cat"],
    "negative_prompt": ["blurry"],
    "adapters": ["", "style:0.5", "style:1,detail:-0.5", "detail:1:0.2", "style:100", "huge", "nobody"],
    "seed": [0, 7, 2**63 - 1],
    "steps": [1, 2],
    "width": [16, 8, None],
    "height": [16, 8, None],
    "guidance": [0, 1, 5.0, 100],
    "scheduler": ["euler", "ddim", "nope"],
    "num_images": [1, 2],
    "format": ["png", "json", "gif"],
}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Iterator[TestClient]:
    pipe = tiny_pipeline(tmp_path_factory.mktemp("tiny"))
    directory = tmp_path_factory.mktemp("fuzz_adapters")
    for seed, name in enumerate(("style", "detail"), start=1):
        adapter = random_adapter(pipe, seed=seed, unet=("to_q", "to_v"), te=("q_proj",), name=name)
        save_adapter(adapter, directory / f"{name}.safetensors")
    huge = random_adapter(pipe, seed=3, unet=("to_k",), name="huge")  # B·A past float32's range
    huge.modules = {
        k: LoraWeights(w.down * 0 + 1e19, w.up * 0 + 1e19, w.alpha) for k, w in huge.modules.items()
    }
    save_adapter(huge, directory / "huge.safetensors")
    limits = Limits(max_size=16, max_steps=1, max_images=2)
    engine = Engine(pipe, adapter_dir=[str(directory)], limits=limits)
    with TestClient(create_app(engine, max_body_bytes=BODY_LIMIT), raise_server_exceptions=False) as test:
        yield test


def rss_bytes() -> int:
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


# ------------------------------------------------------------------------------------------ the generator


def _value(rng: random.Random, field: str) -> Any:
    """A value for `field`: mostly a valid one, else anything JSON holds."""
    roll = rng.random()
    if roll < 0.3 and field in _CHOICES:
        return rng.choice(_CHOICES[field])
    if roll < 0.7 and field == "adapters":
        return "".join(rng.choice(_SPEC_PIECES) for _ in range(rng.randrange(1, 20)))
    kinds: list[Callable[[], Any]] = [
        lambda: rng.choice(_STRINGS),
        lambda: rng.choice(_NUMBERS),
        lambda: rng.choice([None, True, False, [], {}, [1, "a"], {"a": 1}]),
        lambda: Special(rng.choice(_SPECIALS)),
    ]
    return rng.choice(kinds)()


class Special(str):
    """A number JSON can write but Python's json cannot produce: written as is."""


def _json(value: Any) -> str:
    if isinstance(value, Special):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_json(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def _body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": "a striped cat", "steps": 1, "width": 16, "height": 16}
    for field in rng.sample(sorted(_CHOICES), rng.randrange(1, 5)):  # a few fields changed a case
        body[field] = _value(rng, field)
    if rng.random() < 0.05:
        body[rng.choice(["stepz", "lora", "", "prompt "])] = 1
    if rng.random() < 0.05:
        del body["prompt"]
    return body


def cases(rng: random.Random) -> Iterator[tuple[str, bytes, str]]:
    """(description, body, content type) for CASES requests."""
    for index in range(CASES):
        roll, text = rng.random(), _json(_body(rng))
        content_type = "application/json"
        if roll < 0.05:  # a byte of a valid body changed, or the body cut short
            cut = rng.randrange(len(text))
            text = text[:cut] + rng.choice(["", "}", "\x00", "{", '"', ",,"]) + text[cut + 1 :]
        elif roll < 0.08:
            text = rng.choice(["[1, 2]", '"x"', "null", "1e400", "", "{}", "[" * 20000, '{"a":' * 5000])
        elif roll < 0.11:
            content_type = rng.choice(["text/plain", "application/x-www-form-urlencoded", "", "image/png"])
        elif roll < 0.14:
            text = _json({"prompt": "x" * rng.choice([BODY_LIMIT, 5 * 2**20])})
        yield (
            f"case {index}: {content_type} {text[:200]!r}",
            text.encode("utf-8", "surrogatepass"),
            content_type,
        )


# ------------------------------------------------------------------------------------------ the checks


def check_answer(response, description: str) -> str:
    """'image' or 'refused' when the answer is one of the two allowed outcomes; fails the test otherwise."""
    status = response.status_code
    assert status < 500, f"{status} for {description}: {response.text[:500]}"
    if status == 200:
        if response.headers["content-type"] == "image/png":
            pngs = [response.content]
        else:
            pngs = [base64.b64decode(image) for image in response.json()["images"]]
        for png in pngs:
            image = Image.open(io.BytesIO(png))
            image.verify()
            assert set(image.size) <= {8, 16}, description  # within the server's --max-size of 16
        return "image"
    assert 400 <= status < 500, f"{status} for {description}"
    error = response.json()["error"]
    assert isinstance(error, str) and error.strip(), f"empty error for {description}"
    return "refused"


def test_every_request_ends_in_a_4xx_json_error_or_a_valid_image(client):
    rng = random.Random(SEED)
    outcomes: dict[str, int] = {"image": 0, "refused": 0}
    statuses: set[int] = set()
    baseline = None
    for number, (description, body, content_type) in enumerate(cases(rng)):
        headers = {"content-type": content_type} if content_type else {}
        start = time.perf_counter()
        response = client.post("/generate", content=body, headers=headers)
        elapsed = time.perf_counter() - start
        outcome = check_answer(response, description)
        outcomes[outcome] += 1
        bound = RENDER_SECONDS if outcome == "image" else REFUSAL_SECONDS
        assert elapsed < bound, f"{elapsed:.1f} s for {description}"
        statuses.add(response.status_code)
        if number % 50 == 0:
            assert client.get("/health").json()["status"] == "ok"
        if number == 40:  # the first renders, compositions and tokenisations have allocated what they keep
            baseline = rss_bytes()
    grown = rss_bytes() - (baseline or 0)
    assert client.get("/health").json()["status"] == "ok"
    assert grown < RSS_GROWTH_BYTES, f"RSS grew {grown / 2**20:.1f} MiB over the cases"
    # the cases reach every outcome: images, and refusals by the body limit, validation and the adapters
    assert outcomes["image"] >= 10 and {200, 404, 413, 422} <= statuses, (outcomes, statuses)
