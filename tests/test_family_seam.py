"""The model-family seam holds: what differs between families lives in `difflora/models/families/`, and
code elsewhere asks the family instead of testing its name. Read from the source with `ast` (nothing is
imported but the registry), so a new `if family == "sdxl"` anywhere fails here with its path and line.

Also: each family's declared facts agree with the configs shipped for it, so detection, loading and the
defaults that read those facts cannot drift from the files that build the model.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.models.families import FAMILY_NAMES, checkpoint_families, families

PACKAGE = Path(__file__).resolve().parent.parent / "difflora"
# The family modules themselves, and the shipped configs (data, not code).
EXEMPT = (PACKAGE / "models" / "families", PACKAGE / "models" / "architectures")
# Identifier words that are family names used in another sense. Keep it minimal, say why for each.
ALLOWED_WORDS: dict[str, str] = {}


def _words(identifier: str) -> set[str]:
    """`is_sdxl` -> {is, sdxl}; `SDXL_TE_PREFIXES` -> {sdxl, te, prefixes}; `TinyModel` -> {tiny, model}."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", identifier)
    return {word.lower() for word in spaced.split("_") if word}


def _identifiers(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, ast.Attribute):
        yield node.attr
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        yield node.name
    elif isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
        yield node.arg
    elif isinstance(node, ast.alias):
        yield node.asname or node.name.rpartition(".")[2]


def family_name_uses(source: str, names: set[str]) -> list[tuple[int, str]]:
    """(line, what) for every string constant equal to a family name and every identifier with a family
    name as one of its words."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
            found.append((node.lineno, f"string {node.value!r}"))
        for identifier in _identifiers(node):
            words = _words(identifier) & names
            if words - set(ALLOWED_WORDS):
                found.append((node.lineno, f"name {identifier}"))
    return found


def _scanned_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if not any(p.is_relative_to(e) for e in EXEMPT)]


def test_no_family_name_outside_the_family_modules():
    names = set(FAMILY_NAMES)
    offences = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in _scanned_files()
        for line, what in family_name_uses(path.read_text(encoding="utf-8"), names)
    ]
    assert not offences, "ask the family (difflora.models.families) instead of naming it:\n" + "\n".join(
        offences
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('if family == "sdxl":\n    pass\n', ["string 'sdxl'"]),
        ("is_sdxl = True\n", ["name is_sdxl"]),
        ("x = naming.SDXL_TE_PREFIXES\n", ["name SDXL_TE_PREFIXES"]),
        ("def f(tiny_model):\n    return tiny_model\n", ["name tiny_model", "name tiny_model"]),
        ('label = "SDXL base"\nsdxl_like = 1\n', ["name sdxl_like"]),
        ('label = "custom architecture"\nsdxlish = 2\n', []),
    ],
    ids=["constant", "flag", "attribute", "argument", "label-is-fine", "no-word"],
)
def test_the_scan_finds_names_as_words_and_constants(source, expected):
    found = [what for _, what in family_name_uses(source, set(FAMILY_NAMES))]
    assert sorted(found) == sorted(expected)


# ------------------------------------------------------------------------ declared facts vs shipped configs


def _config(folder: Path, component: str, name: str = "config.json") -> dict[str, Any]:
    return json.loads((folder / component / name).read_text())


def _native_size(folder: Path) -> int:
    unet, vae = _config(folder, "unet"), _config(folder, "vae")
    size = unet["sample_size"]
    return (size if isinstance(size, int) else size[0]) * 2 ** (len(vae["block_out_channels"]) - 1)


# The UNet families' facts; a transformer family (Flux) declares others, checked with its model side.
UNET_FAMILIES = [f for f in checkpoint_families() if f.denoiser == "unet"]


@pytest.mark.parametrize("family", UNET_FAMILIES, ids=lambda f: f.name)
def test_declared_facts_match_the_shipped_configs(family):
    folder = family.config_dir()
    unet = _config(folder, "unet")
    index = json.loads((folder / "model_index.json").read_text())
    scheduler = _config(folder, "scheduler", "scheduler_config.json")
    assert unet["cross_attention_dim"] == family.cross_attention_dim
    assert tuple(unet["block_out_channels"]) == family.unet_block_out_channels
    assert (unet.get("addition_embed_type") == "text_time") == family.size_conditioning
    assert index["_class_name"] == family.pipeline_class_name
    assert ("safety_checker" in index) == family.pipeline_has_safety_checker
    assert [c for c in ("text_encoder", "text_encoder_2") if c in index] == list(family.text_encoders)
    assert family.components == (family.denoiser, *family.text_encoders)
    assert scheduler.get("prediction_type", "epsilon") == family.default_prediction_type  # diffusers default
    assert _native_size(folder) == family.resolution_for(family.default_prediction_type)
    assert len(family.checkpoint_encoder_names) == len(family.checkpoint_text_encoders)


@pytest.mark.parametrize("family", UNET_FAMILIES, ids=lambda f: f.name)
def test_each_shipped_unet_config_is_claimed_by_its_own_family_only(family):
    unet = _config(family.config_dir(), "unet")
    claimed = [f.name for f in families() if f.matches_model(unet, embedded=False)]
    assert claimed[0] == family.name  # detection order: the first that claims it wins
    assert [f.name for f in checkpoint_families() if f.matches_unet_config(unet)] == [family.name]


def test_the_embedded_model_is_its_own_family_with_its_native_size():
    unet = _config(EMBEDDED_MODEL_DIR, "unet")
    claimed = next(f for f in families() if f.matches_model(unet, embedded=True))
    assert claimed.native_resolution == _native_size(EMBEDDED_MODEL_DIR)
    assert claimed.cross_attention_dim in (None, unet["cross_attention_dim"])
    assert next(f for f in families() if f.matches_model(unet, embedded=False)).config_folder is None
