"""Adapter files: bit-exact round trips, atomic writes, clear errors, and diffusers loading them unchanged."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from difflora.errors import AdapterFormatError
from difflora.formats.native import save_adapter
from difflora.formats.read import load_adapter
from tests.support.adapters import trained_adapter
from tests.support.models import tiny_pipeline


def test_save_load_is_bit_exact_with_metadata(tmp_path):
    adapter = trained_adapter(tiny_pipeline(tmp_path))
    path = save_adapter(adapter, tmp_path / "out" / "style.safetensors")
    loaded = load_adapter(path)
    assert loaded.modules.keys() == adapter.modules.keys()
    for key, weights in adapter.modules.items():
        assert torch.equal(loaded.modules[key].down, weights.down)
        assert torch.equal(loaded.modules[key].up, weights.up)
        assert loaded.modules[key].alpha == weights.alpha
    assert loaded.meta == adapter.meta


def test_file_uses_diffusers_peft_layout_with_classic_text_encoder_names(tmp_path):
    adapter = trained_adapter(tiny_pipeline(tmp_path))
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    keys = load_file(path).keys()
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight" in keys
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)


def test_diffusers_load_lora_weights_reproduces_outputs(tmp_path):
    trained = tiny_pipeline(tmp_path)
    adapter = trained_adapter(trained)  # alpha != rank in both components: metadata must carry alpha
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    fresh = tiny_pipeline(tmp_path)  # same seed, same base weights
    fresh.load_lora_weights(str(path))

    ids = torch.tensor([[512, 5, 9, 77, 513, 513]])
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        context_trained = trained.text_encoder(ids).last_hidden_state
        context_fresh = fresh.text_encoder(ids).last_hidden_state
        torch.testing.assert_close(context_fresh, context_trained)
        expected = trained.unet(latents, 100, encoder_hidden_states=context_trained).sample
        actual = fresh.unet(latents, 100, encoder_hidden_states=context_fresh).sample
    torch.testing.assert_close(actual, expected)
    base = tiny_pipeline(tmp_path)
    with torch.no_grad():
        base_out = base.unet(
            latents, 100, encoder_hidden_states=base.text_encoder(ids).last_hidden_state
        ).sample
    assert not torch.allclose(base_out, actual), "the adapter had no effect, the comparison proves nothing"


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    adapter = trained_adapter(tiny_pipeline(tmp_path))
    path = save_adapter(adapter, tmp_path / "a.safetensors")
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    adapter.meta.name = "changed"
    with pytest.raises(OSError):
        save_adapter(adapter, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_truncated_file_is_reported_as_truncated(tmp_path):
    path = save_adapter(trained_adapter(tiny_pipeline(tmp_path)), tmp_path / "a.safetensors")
    data = path.read_bytes()
    for cut in (len(data) // 2, 200):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(AdapterFormatError, match="truncated"):
            load_adapter(broken)


def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is a text file, not a LoRA")
    with pytest.raises(AdapterFormatError, match="not a safetensors file"):
        load_adapter(path)
    with pytest.raises(AdapterFormatError, match="not found"):
        load_adapter(tmp_path / "missing.safetensors")


def test_file_without_lora_tensors_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(AdapterFormatError, match="holds no LoRA tensors"):
        load_adapter(path)


def test_pickled_files_need_explicit_permission(tmp_path):
    adapter = trained_adapter(tiny_pipeline(tmp_path))
    state = {f"{k}.lora_A.weight": w.down for k, w in adapter.modules.items()}
    state |= {f"{k}.lora_B.weight": w.up for k, w in adapter.modules.items()}
    path = tmp_path / "old.bin"
    torch.save(state, path)
    with pytest.raises(AdapterFormatError, match="pickled"):
        load_adapter(path)
    loaded = load_adapter(path, allow_pickle=True)
    assert loaded.modules.keys() == adapter.modules.keys()
    # no metadata in a pickle: PEFT's rule says scale 1 (alpha = rank)
    assert all(w.alpha == w.rank for w in loaded.modules.values())


def test_header_metadata_says_how_the_adapter_was_made(tmp_path):
    path = save_adapter(trained_adapter(tiny_pipeline(tmp_path)), tmp_path / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["difflora.format_version"] == "1"
    assert header["difflora.base_hash"] == "0123"
    assert json.loads(header["difflora.trigger_words"]) == ["zebrastripes"]
    assert "rank = 4" in header["difflora.config"]
    components = json.loads(header["difflora.components"])
    assert components["unet"]["rank"] == 4 and components["text_encoder"]["alpha"] == 6.0
    peft = json.loads(header["lora_adapter_metadata"])
    assert peft["unet.lora_alpha"] == 2.0 and peft["text_encoder.r"] == 2
