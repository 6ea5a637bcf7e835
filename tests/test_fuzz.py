"""Seeded fuzzing of everything difflora reads from users: the adapter spec grammar, TOML configs, caption
and metadata files, safetensors headers and adapter files. Every case ends in a valid result or a
DiffloraError with a message; never another exception, a hang (each case has a time limit, enforced by a
timer signal) or memory growth past a bound (tracemalloc: per-case peak, and what stays after all cases).

The generators mutate valid inputs (a real safetensors header, valid config keys) as well as producing
noise, so the cases reach past the first check. Bugs these found are fixed in the readers: see the
README's Reliability section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import struct
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import save

from difflora.config import load_config
from difflora.config.generate import GenerateConfig
from difflora.config.spec import parse_adapter_weights, parse_sweep
from difflora.config.train import TrainConfig
from difflora.data.scan import scan_folder
from difflora.errors import DiffloraError
from difflora.formats.read import load_adapter
from difflora.safe_io import read_safetensors, read_safetensors_header
from tests.support.cli import run_cli

SEED = 1337
CASE_SECONDS = 5.0  # far above any honest case (milliseconds); a hang trips it
CASE_PEAK_BYTES = 256 * 1024 * 1024  # a case's Python allocations (the inputs themselves are <= ~3 MB)
RETAINED_BYTES = 16 * 1024 * 1024  # what may stay allocated after all cases (caches, interned strings)


class Hang(Exception):
    pass


@contextmanager
def bounded_cases() -> Iterator[Callable[[Callable[[], Any], str], Any]]:
    """Yields `case(function, description)`: runs it under the time and memory bounds and returns its result
    (None when it raised a DiffloraError, whose message must not be empty)."""
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]

    def on_alarm(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, on_alarm)

    def case(function: Callable[[], Any], description: str) -> Any:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
        try:
            return function()
        except DiffloraError as error:
            assert str(error).strip(), f"empty message for {description}"
            return None
        except Hang:
            pytest.fail(f"no answer within {CASE_SECONDS}s: {description}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            peak = tracemalloc.get_traced_memory()[1] - start
            assert peak < CASE_PEAK_BYTES, f"{peak / 2**20:.0f} MiB for {description}"

    try:
        yield case
    finally:
        signal.signal(signal.SIGALRM, previous)
        retained = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
    assert retained < RETAINED_BYTES, f"{retained / 2**20:.1f} MiB still allocated after the cases"


def noise(rng: random.Random, size: int) -> bytes:
    return bytes(rng.randrange(256) for _ in range(size))


# ------------------------------------------------------------------------------------------ adapter specs

_SPEC_PIECES = [
    *"abz:,.=-+eE0123456789 \\/_",
    "te=",
    "nan",
    "inf",
    "C:",
    "1e309",
    "é",
    "\x00",
    "\t",
    "１",
    "1_0",
]


def test_adapter_spec_grammar():
    rng = random.Random(SEED)
    with bounded_cases() as case:
        for _ in range(3000):
            text = "".join(rng.choice(_SPEC_PIECES) for _ in range(rng.randrange(30)))
            for parse, argument in (
                (parse_adapter_weights, text),
                (parse_adapter_weights, [text, text[::-1]]),
            ):
                result = case(lambda parse=parse, argument=argument: parse(argument), repr(argument))
                if result is not None:  # a valid spec: named, finite, each adapter once
                    names = [entry.name for entry in result]
                    assert all(name and name == name.strip() for name in names) and len(set(names)) == len(
                        names
                    )
                    assert all(
                        math.isfinite(e.weight) and math.isfinite(e.text_encoder_weight) for e in result
                    )
            sweep = case(lambda text=text: parse_sweep(text), repr(text))
            assert sweep is None or all(math.isfinite(w) for w in sweep[1])


# ------------------------------------------------------------------------------------------ TOML configs


def _toml_value(rng: random.Random, depth: int = 0) -> str:
    choices = [
        lambda: str(rng.randint(-10, 10**20)),
        lambda: repr(rng.uniform(-10, 10)),
        lambda: rng.choice(["true", "false", "nan", "inf", "-inf", "1979-05-27T07:32:00Z", "0x1f", "1e400"]),
        lambda: json.dumps(rng.choice(["", "x", "euler", "adamw", "no", ".txt", "a:b", "1", "é", "a\\b"])),
        lambda: "'''" + "x" * rng.randrange(3) + "'''",
        lambda: "[" + ", ".join(_toml_value(rng, depth + 1) for _ in range(rng.randrange(4))) + "]",
        lambda: (
            "{" + ", ".join(f"k{i} = {_toml_value(rng, depth + 1)}" for i in range(rng.randrange(3))) + "}"
        ),
    ]
    return rng.choice(choices[: 5 if depth >= 2 else None])()


def _toml_document(rng: random.Random, cls: type) -> bytes:
    names = [field.name for field in dataclasses.fields(cls)]
    lines = [rng.choice(["[train]", "[generate]", "[other]", "[[train]]"])] if rng.random() < 0.3 else []
    for _ in range(rng.randrange(6)):
        key = rng.choice(names) if rng.random() < 0.85 else rng.choice(["rnak", "train", '"quoted key"'])
        lines.append(f"{key} = {_toml_value(rng)}")
    text = "\n".join(lines).encode()
    roll = rng.random()
    if roll < 0.1:
        return noise(rng, rng.randrange(60))
    if roll < 0.2:
        return text + b"\xff\xfe\x00"  # not UTF-8
    if roll < 0.25:
        return text + b"\x00"
    return text


@pytest.mark.slow
def test_toml_configs(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "config.toml"
    valid = 0
    with bounded_cases() as case:
        for _ in range(1000):
            cls, section = rng.choice([(TrainConfig, "train"), (GenerateConfig, "generate")])
            path.write_bytes(_toml_document(rng, cls))
            overrides = {"data_dir": "images", "prompt": "a cat"} if rng.random() < 0.5 else None
            overrides = {k: v for k, v in (overrides or {}).items() if hasattr(cls, k)} or None
            config = case(
                lambda cls=cls, section=section, overrides=overrides: load_config(
                    cls, toml_path=path, section=section, overrides=overrides
                ),
                path.read_bytes()[:300].decode("utf-8", "replace"),
            )
            valid += config is not None
    assert valid > 20  # the generator also reaches configs that are valid


# ------------------------------------------------------------------------------------------ captions


def _caption_bytes(rng: random.Random) -> bytes:
    kinds = [
        lambda: noise(rng, rng.randrange(200)),
        lambda: b"tag, " * rng.randrange(1, 300_000),  # up to 1.5 MB on one line
        lambda: b"tag\x00tag, \x00\x00" * rng.randrange(1, 100),
        lambda: rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]) + noise(rng, rng.randrange(50)),
        lambda: "\u2028é\r\n\t\x0b".encode() * rng.randrange(1, 1000),
    ]
    return rng.choice(kinds)()


def _metadata_bytes(rng: random.Random, csv: bool) -> bytes:
    if csv:
        tail = rng.choice([b"\x00", b'"unterminated', b"a,b,c,d\n", b"\r\r\n", b""])
        return b"file_name,text\n0.png," + b"x" * rng.choice([10, 200_000]) + b"\n" + tail + noise(rng, 20)
    name = rng.choice([b"1", b"null", b"[]", b'"../x.png"', b'"/etc/passwd"', b'"0.png"', b'"\\u0000"'])
    text = rng.choice([b"1", b"null", b"[1]", b'{"a": 1}', b'"y"', b'"' + b"z" * 100_000 + b'"'])
    return b'{"file_name": ' + name + b', "text": ' + text + b"}\n" + noise(rng, 30) + b"\n[1]\n"


@pytest.mark.slow
def test_caption_and_metadata_files(tmp_path):
    rng = random.Random(SEED)
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (16, 16), "red").save(root / "0.png")
    files = ["0.txt", "0.caption", "metadata.jsonl", "metadata.csv", "orphan.txt"]
    with bounded_cases() as case:
        for _ in range(100):
            for name in files:
                (root / name).unlink(missing_ok=True)
            for name in rng.sample(files, rng.randrange(1, 4)):
                is_metadata = name.startswith("metadata")
                content = _metadata_bytes(rng, name.endswith("csv")) if is_metadata else _caption_bytes(rng)
                (root / name).write_bytes(content)
            strict, trigger = rng.random() < 0.5, rng.choice([None, "zebra"])
            result = case(lambda s=strict, t=trigger: scan_folder(root, strict=s, trigger=t), "captions")
            if result is not None:
                assert all("\n" not in e.caption for e in result.examples)  # one line to the text encoder


# ------------------------------------------------------------------------------------------ safetensors

_LORA_KEYS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
    "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight",
    "x.alpha",
    "unet..lora_A.weight",
]
_HEADER_KEYS = [
    "lora_adapter_metadata",
    "difflora.format_version",
    "difflora.trigger_words",
    "ss_network_dim",
]
_HEADER_VALUES = [
    "", "{", "[]", "null", "1", "nan", '{"unet.lora_alpha": "abc"}', '{"unet.alpha_pattern": [1]}',
    '{"unet.alpha_pattern": {"(a+)+$": 4}}', '{"unet.alpha_pattern": {"[": 4}}', '["a"]', '[1, 2]',
    '{"unet.use_rslora": true, "unet.lora_alpha": 4}', "sd_v1", "-1e999",
]  # fmt: skip


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    leaves = [
        lambda: rng.choice([-1, 0, 3, 2**53, 2**64, 2**60]),
        lambda: rng.random() * 1e3,
        lambda: rng.choice(["F32", "F16", "BF16", "I8", "BOOL", "X9", ""]),
        lambda: rng.choice([None, True, False]),
    ]
    nodes = [
        lambda: [_random_json(rng, depth + 1) for _ in range(rng.randrange(4))],
        lambda: {
            rng.choice(["dtype", "shape", "data_offsets", "__metadata__", "a"]): _random_json(rng, depth + 1)
        },
    ]
    return rng.choice(leaves + (nodes if depth < 3 else []))()


def _random_tensor(rng: random.Random) -> torch.Tensor:
    shape = [rng.randrange(0, 5) for _ in range(rng.choice([0, 1, 2, 2, 2, 3, 4, 4, 5]))]
    dtype = rng.choice([torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.bool, torch.float64])
    if dtype is torch.bool:
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape) * rng.choice([1.0, 1e30, 0.0])).to(dtype)


def _adapter_file(rng: random.Random) -> bytes:
    """A well-formed safetensors file whose tensors and header a LoRA reader must judge."""
    tensors = {rng.choice(_LORA_KEYS): _random_tensor(rng) for _ in range(rng.randrange(1, 5))}
    if rng.random() < 0.3:  # a sound LoRA pair (native layout), so the header values are what is judged
        rank = rng.randrange(1, 4)
        tensors = {_LORA_KEYS[0]: torch.randn(rank, 8), _LORA_KEYS[1]: torch.randn(8, rank)}
    metadata = {rng.choice(_HEADER_KEYS): rng.choice(_HEADER_VALUES) for _ in range(rng.randrange(5))}
    return save(tensors, metadata=metadata)


def _damaged_file(rng: random.Random) -> bytes:
    """Bytes that are not a well-formed safetensors file: noise, absurd header lengths, a real header
    mutated (random JSON, wrong dtypes or shapes, overlapping offsets, bad __metadata__)."""
    good = save({"unet.a.lora_A.weight": torch.ones(2, 3), "unet.a.lora_B.weight": torch.ones(3, 2)})
    length = struct.unpack("<Q", good[:8])[0]
    header, data = json.loads(good[8 : 8 + length]), good[8 + length :]
    kind = rng.randrange(6)
    if kind == 0:
        return noise(rng, rng.randrange(40))
    if kind == 1:
        length = rng.choice([2**60, 2**64 - 1, 0, 1, 7, 100, 2**31])
        return struct.pack("<Q", length) + b"{" + noise(rng, rng.randrange(40))
    if kind == 2:
        header = _random_json(rng)
    elif kind == 3:
        header["unet.a.lora_A.weight"][rng.choice(["dtype", "shape", "data_offsets"])] = _random_json(rng)
    elif kind == 4:
        header["unet.a.lora_A.weight"]["data_offsets"] = list(header["unet.a.lora_B.weight"]["data_offsets"])
        data = data[: rng.randrange(len(data) + 1)]
    else:
        header["__metadata__"] = _random_json(rng)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.slow
def test_safetensors_headers_and_adapter_files(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "adapter.safetensors"
    loaded = 0
    with bounded_cases() as case:
        for index in range(1500):
            payload = _adapter_file(rng) if index % 2 else _damaged_file(rng)
            path.write_bytes(payload)
            described = f"case {index}: {payload[:200]!r}"
            for read in (read_safetensors, read_safetensors_header):
                case(lambda read=read: read(path), described)
            adapter = case(lambda: load_adapter(path), described)
            if adapter is not None:
                loaded += 1
                assert adapter.modules and all(
                    w.rank >= 1 and math.isfinite(w.alpha) for w in adapter.modules.values()
                )
    assert loaded > 50  # valid files are among the cases, and they load


@pytest.mark.slow
def test_the_cli_answers_fuzzed_inputs_with_one_line(tmp_path):
    """As a user meets them: a damaged adapter to `inspect`, a binary file as `--config`, a bad spec."""
    rng = random.Random(SEED)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(struct.pack("<Q", 2**60) + b"{" + noise(rng, 30))
    config = tmp_path / "run.toml"
    config.write_bytes(b"rank = 8\n" + b"\xff\xfe" + noise(rng, 20))
    for args, code in (
        (["inspect", str(damaged)], 1),
        (["train", "images", "--config", str(config)], 2),
        (["merge", "a:nan,b", "-o", str(tmp_path / "m.safetensors")], 2),
    ):
        result = run_cli(args)
        assert result.returncode == code, result.stderr[-2000:]
        assert result.stderr.strip().startswith("Error: ") and "Traceback" not in result.stderr
