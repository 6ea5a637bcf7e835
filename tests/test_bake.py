"""`difflora merge --into-base`: where each module lives in the original file (against the test support's own
diffusers -> ldm/sgm name table, OpenCLIP's fused q/k/v rows included), the baked tensors against W0 + Σ wᵢΔWᵢ
computed from the adapter files, and (slow) a full-size SD 1.5 file: baked, loaded by difflora's loader
(diffusers' from_single_file with the shipped configs), generating what the base generates with the
adapters fused."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from difflora.adapter.names import adaptable_modules, classic_name
from difflora.adapter.types import Adapter, LoraWeights
from difflora.cli import cli
from difflora.composition.bake import BAKED_KEY, Source, bake_tensors, ldm_sources
from difflora.errors import ConfigError
from difflora.formats.native import save_adapter
from difflora.formats.reference import reference_model
from difflora.models.families import family as model_family
from tests.support.checkpoints import checkpoint_entries, write_header_only


def _expected_sources(family: str) -> dict[str, tuple[str, int]]:
    """difflora module key -> (original key, index of its part in that tensor), from the support's table."""
    expected = {}
    adaptable = {}
    for entry in checkpoint_entries(family):
        if entry.component not in ("unet", "text_encoder", "text_encoder_2") or not entry.key.endswith(
            "weight"
        ):
            continue
        model = reference_model(family, entry.component)
        if entry.component not in adaptable:
            adaptable[entry.component] = set(adaptable_modules(model))
        for part, param in enumerate(entry.params):
            live = param.removesuffix(".weight")
            if live in adaptable[entry.component]:
                expected[f"{entry.component}.{classic_name(entry.component, live, model)}"] = (
                    entry.key,
                    part,
                )
    return expected


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_every_adaptable_module_is_found_where_the_file_holds_it(family):
    shapes = {e.key: e.shape for e in checkpoint_entries(family)}
    expected = _expected_sources(family)
    models = {c: reference_model(family, c) for c in {k.partition(".")[0] for k in expected}}
    known = model_family(family)
    found = ldm_sources(
        shapes,
        models,
        sorted(expected),
        denoiser=known.denoiser,
        text_prefixes=known.checkpoint_text_encoders,
    )
    assert len(found) == len(expected) > 100
    for module, (key, part) in expected.items():
        source, shape = found[module]
        assert source.key == key, module
        rows = shape[0]  # a fused in_proj holds q, k, v one after the other
        assert torch.equal(source.rows, torch.arange(part * rows, (part + 1) * rows)), module


def test_baked_tensors_are_w0_plus_the_weighted_updates_rounded_once():
    g = torch.Generator().manual_seed(0)
    w0 = {"fused": torch.randn(12, 5, generator=g).half(), "plain": torch.randn(4, 5, generator=g).half()}
    sources = {
        "unet.k": (Source("fused", torch.arange(4, 8)), (4, 5)),
        "unet.p": (Source("plain", torch.arange(4)), (4, 5)),
    }
    a = LoraWeights(torch.randn(2, 5, generator=g), torch.randn(4, 2, generator=g), alpha=1.0)
    b = LoraWeights(torch.randn(3, 5, generator=g), torch.randn(4, 3, generator=g), alpha=6.0)
    merged = Adapter({"unet.k": a, "unet.p": b})
    tensors = dict(w0)
    result = bake_tensors(tensors, sources, merged)
    expected_fused = w0["fused"].float().clone()
    expected_fused[4:8] += 0.5 * a.up @ a.down
    assert torch.equal(tensors["fused"], expected_fused.half())
    assert torch.equal(tensors["plain"], (w0["plain"].float() + 2.0 * b.up @ b.down).half())
    assert result.tensors == {"fused": 4, "plain": 4}
    assert torch.equal(tensors["fused"][:4], w0["fused"][:4]) and torch.equal(
        tensors["fused"][8:], w0["fused"][8:]
    )


def test_into_base_refuses_rank_and_a_non_checkpoint(tmp_path):
    result = CliRunner().invoke(
        cli, ["merge", "a", "--into-base", "x.safetensors", "--rank", "4", "-o", "o.safetensors"]
    )
    assert result.exit_code != 0 and "a baked base holds the exact update" in result.output
    with pytest.raises(ConfigError, match="into_base|into-base"):
        from difflora.config.merge import MergeConfig

        MergeConfig(adapters=("a",), output="o.safetensors", into_base="model.ckpt")
    adapter = tmp_path / "a.safetensors"
    save_adapter(Adapter({"unet.x": LoraWeights(torch.ones(1, 2), torch.ones(2, 1), 1.0)}), adapter)
    header_only = tmp_path / "sd1.safetensors"
    write_header_only(header_only, "sd1")
    out = tmp_path / "o.safetensors"
    refused = CliRunner().invoke(
        cli, ["merge", str(adapter), "--into-base", str(header_only), "-o", str(out)]
    )
    assert refused.exit_code != 0 and "unet.x is not a weight of this base file's unet" in refused.output
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("real_checkpoint", ["sd1"], indirect=True)
def test_baked_sd15_loads_in_diffusers_and_generates_what_fusing_does(real_checkpoint, tmp_path):
    import gc
    import json

    import numpy as np
    from PIL import Image
    from safetensors import safe_open

    from difflora.composition.bake import BAKED_KEY
    from difflora.composition.composer import Composer
    from difflora.config.generate import GenerateConfig
    from difflora.generation.generate import generate
    from difflora.models.loading import load_pipeline
    from tests.support.adapters import random_adapter

    pipe = load_pipeline(real_checkpoint, dtype=torch.float32)
    adapters = tmp_path / "adapters"
    for name, seed, unet, te in (
        ("style", 1, ("to_q", "to_v"), ("q_proj",)),
        ("subject", 2, ("to_v",), ("v_proj",)),
    ):
        save_adapter(
            random_adapter(pipe, seed=seed, unet=unet, te=te, scale=0.05, name=name),
            adapters / f"{name}.safetensors",
        )
    spec = f"{adapters / 'style.safetensors'}:0.7,{adapters / 'subject.safetensors'}:0.3"
    settings = dict(prompt="a photo of sks dog", steps=1, guidance=1.0, seed=0, width=64, height=64)
    composer = Composer(pipe)
    fused_png = generate(
        GenerateConfig(adapters=(spec,), out=str(tmp_path / "fused"), **settings), composer=composer
    )
    fused = {k: v.clone() for k, v in pipe.unet.state_dict().items() if "attn" in k}
    fused_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    del pipe, composer
    gc.collect()

    baked_path = tmp_path / "baked.safetensors"
    result = CliRunner().invoke(
        cli, ["merge", spec, "--into-base", str(real_checkpoint), "-o", str(baked_path)]
    )
    assert result.exit_code == 0, result.output
    with (
        safe_open(str(baked_path), framework="pt") as handle,
        safe_open(str(real_checkpoint), framework="pt") as base,
    ):
        assert set(handle.keys()) == set(base.keys())
        record = json.loads(handle.metadata()[BAKED_KEY])
        key = "model.diffusion_model.input_blocks.1.1.norm.weight"  # no adapter touches it: bit for bit
        assert torch.equal(handle.get_tensor(key), base.get_tensor(key))
        assert handle.get_tensor(key).dtype == base.get_tensor(key).dtype == torch.float16
    assert [(r["adapter_name"], r["weight"]) for r in record] == [("style", 0.7), ("subject", 0.3)]

    baked = load_pipeline(baked_path, dtype=torch.float32)  # diffusers' from_single_file, offline configs
    # the base's fp16 weight + the update, rounded once to fp16: fusing's weight, to that rounding
    for name, value in baked.unet.state_dict().items():
        if name in fused:
            torch.testing.assert_close(value, fused[name], rtol=2**-10, atol=1e-6)
    for name, value in baked.text_encoder.state_dict().items():
        torch.testing.assert_close(value, fused_te[name], rtol=2**-10, atol=1e-6)
    baked_png = generate(GenerateConfig(out=str(tmp_path / "baked"), **settings), composer=Composer(baked))
    a, b = (np.asarray(Image.open(p[0]), dtype=np.int16) for p in (fused_png, baked_png))
    assert np.abs(a - b).max() <= 2  # the same image, to the fp16 rounding of the changed weights


# ------------------------------------------------------------------------------ Flux: BFL transformer files

# (adapter, seed, weight, transformer modules, CLIP modules): q/k/v of both fused layouts, a single block's
# MLP input, the final modulation (whose halves BFL swaps) and plain renames.
_FLUX_ADAPTERS = (
    (
        "style",
        1,
        0.7,
        (
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_v",
            "transformer_blocks.0.attn.add_k_proj",
            "single_transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.0.proj_mlp",
            "norm_out.linear",
        ),
        ("text_model.encoder.layers.0.self_attn.q_proj",),
    ),
    (
        "subject",
        2,
        0.3,
        ("transformer_blocks.0.attn.to_v", "single_transformer_blocks.0.attn.to_q", "proj_out"),
        (),
    ),
)


def _flux_adapters(pipe, folder, *, text: bool):
    """The adapters written to `folder`, and each module's Σ wᵢ·ΔWᵢ (float64, from the factors)."""
    from difflora.adapter.types import AdapterMeta

    deltas: dict[str, torch.Tensor] = {}
    specs = []
    for name, seed, weight, modules, clip in _FLUX_ADAPTERS:
        g = torch.Generator().manual_seed(seed)
        loras = {}
        for component, paths in (("transformer", modules), ("text_encoder", clip if text else ())):
            model = getattr(pipe, component)
            for path in paths:
                live = path.removeprefix("text_model.") if component == "text_encoder" else path
                rows, columns = model.get_submodule(live).weight.shape
                lora = LoraWeights(
                    torch.randn(2, columns, generator=g) * 0.1, torch.randn(rows, 2, generator=g) * 0.1, 4.0
                )
                loras[f"{component}.{path}"] = lora
                delta = weight * 2.0 * lora.up.double() @ lora.down.double()
                deltas[f"{component}.{live}"] = deltas.get(f"{component}.{live}", 0) + delta
        save_adapter(Adapter(loras, AdapterMeta(name=name)), folder / f"{name}.safetensors")
        specs.append(f"{folder / name}.safetensors:{weight}")
    return ",".join(specs), deltas


@pytest.mark.parametrize("kind", ["bare", "all-in-one"])  # all-in-one: ComfyUI's prefix too
def test_a_bfl_flux_file_is_baked_into_its_fused_rows_and_loads_as_the_fused_composition(kind, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from difflora.models.dit_files import ComponentFiles
    from difflora.models.loading import load_pipeline
    from tests.support.flux import bfl_transformer_state, tiny_flux_pipeline, write_flux_files

    pipe = tiny_flux_pipeline(seed=4)
    paths = write_flux_files(pipe, tmp_path / "parts", prefix=kind != "bare", dtype=torch.bfloat16)
    files = ComponentFiles(clip_l=str(paths["clip_l"]), t5=str(paths["t5"]), vae=str(paths["vae"]))
    base = paths["model"]
    if kind == "all-in-one":  # ComfyUI's: the components under their prefixes, CLIP in bf16 too
        heads = {"model": "", "clip_l": "text_encoders.clip_l.transformer.", "vae": "vae."}
        heads["t5"] = "text_encoders.t5xxl.transformer."
        state = {heads[n] + k: v for n, p in paths.items() for k, v in load_file(p).items()}
        base, files = tmp_path / "all-in-one.safetensors", None
        save_file({k: v.to(torch.bfloat16) if "clip_l" in k else v for k, v in state.items()}, str(base))
    spec, deltas = _flux_adapters(pipe, tmp_path / "adapters", text=kind == "all-in-one")
    baked = tmp_path / "baked.safetensors"
    result = CliRunner().invoke(cli, ["merge", spec, "--into-base", str(base), "-o", str(baked)])
    assert result.exit_code == 0, result.output

    original, written = load_file(str(base)), load_file(str(baked))
    assert set(written) == set(original)
    # W0 as the file holds it plus the updates, mapped to BFL by the support's own (independent) key map
    loaded = load_pipeline(base, files=files)
    for component in ("transformer", "text_encoder"):
        model = getattr(loaded, component)
        for key, delta in deltas.items():
            if key.startswith(component + "."):
                weight = model.get_submodule(key.partition(".")[2]).weight
                weight.data = (weight.double() + delta).float()
    head = "" if kind == "bare" else "model.diffusion_model."
    expected = {head + k: v for k, v in bfl_transformer_state(loaded.transformer).items()}
    if kind == "all-in-one":  # transformers 5 writes CLIP without `text_model.`, as the file holds it
        clip = "text_encoders.clip_l.transformer.encoder.layers.0.self_attn.q_proj.weight"
        expected[clip] = loaded.text_encoder.get_submodule("encoder.layers.0.self_attn.q_proj").weight
    changed, kept_rows = 0, {}
    for key, tensor in written.items():
        assert tensor.dtype == original[key].dtype, key
        if key not in expected or torch.equal(expected[key].to(tensor.dtype), original[key]):
            assert torch.equal(tensor, original[key]), key  # untouched: bit for bit
            continue
        changed += 1  # W0 + Σ wᵢ·ΔWᵢ rounded once to bf16: within one bf16 step of the exact value
        torch.testing.assert_close(tensor.float(), expected[key].float(), rtol=2**-7, atol=1e-6)
        kept = (expected[key].double() == original[key].double()).flatten(1).all(dim=1)  # rows no ΔW hits
        assert torch.equal(tensor[kept], original[key][kept]), key
        kept_rows[key] = int(kept.sum())
    # qkv (image, text), linear1, final modulation, final linear (+ CLIP's q_proj in the all-in-one file)
    assert changed == 5 + (kind == "all-in-one")
    width = pipe.transformer.config.attention_head_dim  # one head: q, k, v are each this many rows
    assert kept_rows[head + "double_blocks.0.img_attn.qkv.weight"] == width  # k's rows
    assert kept_rows[head + "double_blocks.0.txt_attn.qkv.weight"] == 2 * width  # q's and v's
    assert kept_rows[head + "single_blocks.0.linear1.weight"] == width  # v's
    with safe_open(str(baked), framework="pt") as handle:
        record = json.loads(handle.metadata()[BAKED_KEY])
    assert [(r["adapter_name"], r["weight"]) for r in record] == [("style", 0.7), ("subject", 0.3)]

    # difflora's loader reads the baked file as the fused composition, to bf16's rounding
    again = load_pipeline(baked, files=files)
    for component in ("transformer", "text_encoder"):
        want = getattr(loaded, component).state_dict()
        for name, value in getattr(again, component).state_dict().items():
            torch.testing.assert_close(value, want[name], rtol=2**-7, atol=1e-6, msg=name)
    if kind == "bare":  # a text encoder's adapter cannot go into a file that holds none
        spec, _ = _flux_adapters(pipe, tmp_path / "with-clip", text=True)
        out = tmp_path / "refused.safetensors"
        refused = CliRunner().invoke(cli, ["merge", spec, "--into-base", str(base), "-o", str(out)])
        assert refused.exit_code != 0 and "is not a weight of this transformer file" in refused.output
        assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in refused.output
        assert not out.exists()
