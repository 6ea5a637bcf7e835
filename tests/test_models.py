"""--model resolution and base identity, offline."""

from __future__ import annotations

import pytest
import torch

from difflora.errors import ModelError
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline, resolve_model
from tests.support.models import tiny_pipeline


def test_folder_loads_and_identity_is_stable(tmp_path):
    folder = tmp_path / "model"
    tiny_pipeline(tmp_path).save_pretrained(folder)
    assert resolve_model(folder).kind == "folder"
    first = model_identity(load_pipeline(folder))
    second = model_identity(load_pipeline(str(folder)))
    assert first == second
    assert first.family == "custom" and first.architecture.startswith("custom-")


def test_identity_tells_two_bases_apart_but_not_two_architectures(tmp_path):
    a = tiny_pipeline(tmp_path, seed=0)
    b = tiny_pipeline(tmp_path, seed=1)
    ia, ib = model_identity(a), model_identity(b)
    assert ia.architecture == ib.architecture
    assert ia.base_hash != ib.base_hash


def test_identity_ignores_injected_adapters(tmp_path):
    from difflora.adapter.inject import add_lora
    from difflora.adapter.spec import LoraSpec

    plain = model_identity(tiny_pipeline(tmp_path))
    adapted_pipe = tiny_pipeline(tmp_path)
    add_lora(adapted_pipe.unet, "unet", LoraSpec(rank=2, alpha=2))
    assert model_identity(adapted_pipe).base_hash == plain.base_hash


def test_folder_without_model_index_is_explained(tmp_path):
    with pytest.raises(ModelError, match="model_index.json"):
        resolve_model(tmp_path)


def test_hub_id_offline_says_there_is_no_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="no network"):
        load_pipeline("someone/some-model")


def test_pickled_single_file_needs_permission(tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, path)
    with pytest.raises(ModelError, match="allow-pickle"):
        load_pipeline(path)


def test_unrecognised_reference_is_explained():
    with pytest.raises(ModelError, match="neither a diffusers folder"):
        resolve_model("not/a/valid/ref/at/all")
