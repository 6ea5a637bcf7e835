"""Different adapter sets in one batched forward (difflora.composition.mixed): one layer against the fused
formula computed here in float64 from the adapters' tensors, whole renders against each request rendered alone
with its set fused (SD, SDXL and Flux batch layouts), and the base pipeline untouched afterwards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difflora.adapter.lycoris import LokrWeights
from difflora.adapter.names import adaptable_modules, classic_name
from difflora.adapter.types import Adapter, AdapterMeta, LoraWeights
from difflora.composition.composer import Composer
from difflora.composition.mixed import MixedAdapters, MixedBatchError, render_mixed, sample_rows
from difflora.config.spec import AdapterWeight, parse_adapter_weights
from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.errors import ConfigError
from difflora.generation.pipeline import render
from difflora.models.identity import model_identity
from difflora.models.loading import load_pipeline
from tests.support.models import tiny_pipeline, tiny_sdxl_pipeline

PROMPTS = ["a red circle on a white background", "a blue square on a black background", "a green triangle"]
SEEDS = [11, 12, 13]
STEPS = 4


def make_adapter(
    pipe, seed: int, targets: dict[str, tuple[str, ...]], *, rank=4, alpha=2.0, scale=0.3, name=""
):
    """Random non-zero A and B for the modules of each component whose live names end with a suffix."""
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for component, suffixes in targets.items():
        model = getattr(pipe, component)
        for live, module in adaptable_modules(model).items():
            if any(live.endswith(suffix) for suffix in suffixes):
                shape = module.weight.shape
                down = torch.randn(rank, *shape[1:], generator=generator) * scale
                up = torch.randn(shape[0], rank, *([1, 1] if len(shape) == 4 else []), generator=generator)
                key = f"{component}.{classic_name(component, live, model)}"
                modules[key] = LoraWeights(down, up * scale, alpha)
    identity = model_identity(pipe)
    meta = AdapterMeta(name=name, base_architecture=identity.architecture, base_hash=identity.base_hash)
    return Adapter(modules, meta)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def solo_fused(pipe, sets, **settings) -> np.ndarray:
    """Each request rendered alone (a batch of one) with its set composed fused, then the base restored."""
    images = []
    for prompt, seed, entries in zip(PROMPTS, SEEDS, sets, strict=True):
        composer = Composer(pipe, "fused")
        for adapter, spec in entries:
            composer.add(adapter, spec.weight, spec.te_weight, name=spec.name)
        images += render(pipe, [prompt], seeds=[seed], **settings)
        composer.clear()
    return pixels(images)


def hooks_left(pipe) -> int:
    models = [getattr(pipe, c, None) for c in ("unet", "transformer", "text_encoder", "text_encoder_2")]
    return sum(len(m._forward_hooks) for model in models if model is not None for m in model.modules())


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """On a shared 2-core machine one thread renders several times faster than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ one layer


def test_one_linear_three_sets_equal_the_fused_formula(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    live = next(name for name in adaptable_modules(pipe.unet) if name.endswith("attn1.to_q"))
    a = make_adapter(pipe, 1, {"unet": (live,)}, rank=4, alpha=2.0, name="a")
    b = make_adapter(pipe, 2, {"unet": (live,)}, rank=2, alpha=5.0, name="b")
    c = make_adapter(pipe, 3, {"unet": (live,)}, rank=3, alpha=3.0, name="c")
    sets = [[(a, 0.7)], [(b, -1.3), (a, 0.25)], [(c, 2.0), (b, 0.5), (a, 1.0)]]
    module = pipe.unet.get_submodule(live)
    w0 = module.weight.detach().double()
    key = f"unet.{live}"

    def delta(adapter: Adapter) -> torch.Tensor:  # (alpha / r) · B · A in float64
        weights = adapter.modules[key]
        return weights.alpha / weights.rank * weights.up.double() @ weights.down.double()

    x = torch.randn(3, 5, module.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = module(x)
    with MixedAdapters(pipe, sets), torch.no_grad():
        got = module(x)
        doubled = module(torch.cat([x, x]))  # CFG: [uncond of every sample, cond of every sample]
    for sample, entries in enumerate(sets):
        weight = w0 + sum(w * delta(adapter) for adapter, w in entries)
        want = x[sample].double() @ weight.T
        assert torch.allclose(got[sample].double(), want, rtol=0, atol=2e-5), sample
        assert torch.allclose(doubled[sample].double(), want, rtol=0, atol=2e-5)
        assert torch.allclose(doubled[3 + sample].double(), want, rtol=0, atol=2e-5)
    assert hooks_left(pipe) == 0
    with torch.no_grad():
        assert torch.equal(module(x), base)  # the base layer is untouched


def test_conv_and_text_encoder_weights_per_sample(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    conv = next(name for name in adaptable_modules(pipe.unet) if name.endswith("resnets.0.conv1"))
    te = next(name for name in adaptable_modules(pipe.text_encoder) if name.endswith("q_proj"))
    a = make_adapter(pipe, 4, {"unet": (conv,), "text_encoder": (te,)}, rank=3, alpha=1.5, name="a")
    specs = [AdapterWeight("a", 0.5, te_weight=2.0), AdapterWeight("a", -1.0, te_weight=0.0)]
    module, linear = pipe.unet.get_submodule(conv), pipe.text_encoder.get_submodule(te)
    x = torch.randn(2, module.in_channels, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.randn(2, 7, linear.in_features, generator=torch.Generator().manual_seed(2))
    with MixedAdapters(pipe, [[(a, spec)] for spec in specs]), torch.no_grad():
        got, got_te = module(x), linear(t)
    conv_w = a.modules[f"unet.{conv}"]
    te_w = a.modules[f"text_encoder.{classic_name('text_encoder', te, pipe.text_encoder)}"]
    for sample, spec in enumerate(specs):
        update = conv_w.up.double().flatten(1) @ conv_w.down.double().flatten(1) * conv_w.alpha / conv_w.rank
        weight = module.weight.double() + spec.weight * update.reshape(module.weight.shape)
        want = torch.nn.functional.conv2d(x[sample : sample + 1].double(), weight, module.bias.double(), 1, 1)
        assert torch.allclose(got[sample : sample + 1].double(), want, rtol=0, atol=2e-5)
        te_update = te_w.up.double() @ te_w.down.double() * te_w.alpha / te_w.rank
        te_weight = linear.weight.double() + spec.text_encoder_weight * te_update
        want_te = t[sample].double() @ te_weight.T + linear.bias.double()
        assert torch.allclose(got_te[sample].double(), want_te, rtol=0, atol=2e-5)


def test_rows_map_prompts_cfg_copies_and_repeated_images():
    assert sample_rows(3, 3) == [0, 1, 2]  # a text encoder's call, or the images without CFG
    assert sample_rows(6, 3) == [0, 1, 2, 0, 1, 2]  # CFG's [uncond, cond]
    assert sample_rows(2, 2, images_per_prompt=2) == [0, 1]  # the prompts' text encoding
    assert sample_rows(8, 2, images_per_prompt=2) == [0, 0, 1, 1, 0, 0, 1, 1]
    with pytest.raises(MixedBatchError, match="5 rows for 3 prompts"):
        sample_rows(5, 3)


def test_refusals_leave_the_pipeline_unhooked(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    a = make_adapter(pipe, 1, {"unet": ("to_q",)}, name="a")
    dora = Adapter(
        {
            k: LoraWeights(w.down, w.up, w.alpha, magnitude=torch.ones(w.up.shape[0]))
            for k, w in a.modules.items()
        },
        a.meta,
    )
    key = next(iter(a.modules))
    lokr = Adapter({key: LokrWeights(lokr_w1=torch.ones(2, 2), lokr_w2=torch.ones(2, 2))}, a.meta)
    with pytest.raises(MixedBatchError, match="DoRA modules, which a mixed batch cannot apply"):
        MixedAdapters(pipe, [[(dora, 1.0)]])
    with pytest.raises(MixedBatchError, match="LoKr modules"):
        MixedAdapters(pipe, [[(lokr, 1.0)]])
    with pytest.raises(ConfigError, match=r"2 prompts, 2 seeds, 1 adapter sets; give one of each per image"):
        render_mixed(pipe, PROMPTS[:2], SEEDS[:2], [[(a, 1.0)]])
    with pytest.raises(MixedBatchError, match="appears twice in one set"):
        MixedAdapters(pipe, [[(a, 1.0), (a, 0.5)]])
    with pytest.raises(MixedBatchError, match="overflows float32 in unet module .*to_q .*lower the weights"):
        MixedAdapters(pipe, [[(a, 1e308)]])
    composer = Composer(pipe, "fused")
    composer.add(a, 1.0, name="a")
    with pytest.raises(MixedBatchError, match=r"adapters composed \(a:1\); .* clear its Composer first"):
        MixedAdapters(pipe, [[(a, 1.0)]])
    composer.clear()
    with MixedAdapters(pipe, [[(a, 1.0)], []]) as mixed, torch.no_grad():
        with pytest.raises(MixedBatchError, match="3 rows for 2 prompts"):
            pipe.unet.get_submodule(next(n for n in adaptable_modules(pipe.unet) if n.endswith("to_q")))(
                torch.zeros(3, 4, 32)
            )
        assert mixed.rows(4) == [0, 1, 0, 1]
    assert hooks_left(pipe) == 0


def test_specs_are_resolved_by_the_loader_once(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    a = make_adapter(pipe, 1, {"unet": ("to_q",)}, name="a")
    read: list[str] = []

    def loader(name):
        read.append(name)
        return a, None

    sets = [parse_adapter_weights("a:0.5"), parse_adapter_weights("a:1.5"), []]
    with MixedAdapters(pipe, sets, loader=loader) as mixed:
        assert read == ["a"] and len(mixed._layers) == len(a.modules)
        scales = mixed._layers[0].scales
        assert scales[:, 0].tolist() == [0.5 * 2.0 / 4, 1.5 * 2.0 / 4, 0.0]


# ------------------------------------------------------------------------------------------ whole renders


@pytest.fixture(scope="module")
def sd():
    pipe = load_pipeline(EMBEDDED_MODEL_DIR)
    a = make_adapter(pipe, 1, {"unet": ("to_q", "to_v"), "text_encoder": ("q_proj", "v_proj")}, name="a")
    b = make_adapter(pipe, 2, {"unet": ("to_k", "to_out.0", "conv1")}, rank=2, alpha=4.0, name="b")
    return pipe, a, b


def sets_of(a: Adapter, b: Adapter) -> list[list[tuple[Adapter, AdapterWeight]]]:
    """The base, one adapter with its own text-encoder weight, and two weighted adapters."""
    return [
        [],
        [(a, AdapterWeight("a", 0.8, te_weight=1.5))],
        [(a, AdapterWeight("a", 0.5)), (b, AdapterWeight("b", 0.7))],
    ]


@pytest.mark.slow  # the embedded model at 64 px: 3 solo renders, one mixed batch, two base renders (~8 s)
def test_mixed_batch_equals_solo_fused_renders_and_leaves_the_base(sd):
    pipe, a, b = sd
    before = pixels(render(pipe, PROMPTS[:1], seeds=SEEDS[:1], steps=STEPS))
    sets = sets_of(a, b)
    want = solo_fused(pipe, sets, steps=STEPS)
    got = pixels(render_mixed(pipe, PROMPTS, SEEDS, sets, steps=STEPS))
    # Measured on this CPU: at most 1 of 255 (float rounding: the fused weights against W0·x + update, and a
    # batch of 3 against batches of 1). The adapters change the images by far more (checked below).
    assert int(np.abs(got - want).max()) <= 2
    assert int(np.abs(want[1:] - pixels(render(pipe, PROMPTS[1:], seeds=SEEDS[1:], steps=STEPS))).max()) > 50
    assert hooks_left(pipe) == 0
    assert np.array_equal(pixels(render(pipe, PROMPTS[:1], seeds=SEEDS[:1], steps=STEPS)), before)


@pytest.mark.slow
def test_sdxl_layout_with_both_text_encoders(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path)
    targets = {"unet": ("to_q", "to_v"), "text_encoder": ("q_proj",), "text_encoder_2": ("v_proj",)}
    a = make_adapter(pipe, 1, targets, scale=0.5, name="a")
    b = make_adapter(pipe, 2, {"unet": ("to_k",), "text_encoder_2": ("q_proj",)}, rank=2, scale=0.5, name="b")
    sets = sets_of(a, b)
    settings = {"steps": 3, "width": 32, "height": 32}
    want = solo_fused(pipe, sets, **settings)
    got = pixels(render_mixed(pipe, PROMPTS, SEEDS, sets, **settings))
    assert int(np.abs(got - want).max()) <= 2
    assert int(np.abs(want[1:] - pixels(render(pipe, PROMPTS[1:], seeds=SEEDS[1:], **settings))).max()) > 10


@pytest.fixture(scope="module")
def flux():
    pipe = load_pipeline(EMBEDDED_MODEL_DIR.parent / "flux")
    targets = {
        "transformer": ("to_q", "proj_out", "ff.net.2"),
        "text_encoder": ("q_proj",),
        "text_encoder_2": (".q",),
    }
    a = make_adapter(pipe, 1, targets, scale=0.5, name="a")
    b = make_adapter(pipe, 2, {"transformer": ("to_k", "add_v_proj")}, rank=2, scale=0.5, name="b")
    return pipe, a, b


# true CFG 5: two transformer calls per step (cond, then the negative); 1: one call (guidance-distilled)
@pytest.mark.slow
@pytest.mark.parametrize("true_cfg", [5.0, 1.0])
def test_flux_layout(flux, true_cfg):
    pipe, a, b = flux
    sets = sets_of(a, b)
    settings = {"steps": 3, "true_cfg": true_cfg}
    want = solo_fused(pipe, sets, **settings)
    got = pixels(render_mixed(pipe, PROMPTS, SEEDS, sets, **settings))
    assert int(np.abs(got - want).max()) <= 2
    assert int(np.abs(want[1:] - pixels(render(pipe, PROMPTS[1:], seeds=SEEDS[1:], **settings))).max()) > 10
    assert hooks_left(pipe) == 0


def test_images_per_prompt_with_cfg_equal_solo_fused_calls(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    a = make_adapter(
        pipe, 1, {"unet": ("to_q", "to_out.0"), "text_encoder": ("k_proj",)}, scale=0.5, name="a"
    )
    b = make_adapter(pipe, 2, {"unet": ("to_v",)}, rank=2, scale=0.5, name="b")
    sets = [[(b, 0.9)], [(a, -0.6), (b, 0.3)]]
    call = {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "np", "num_images_per_prompt": 2}

    def generators(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    want = []
    for prompt, seeds, entries in zip(PROMPTS, ([1, 2], [3, 4]), sets, strict=False):
        composer = Composer(pipe, "fused")
        for adapter, weight in entries:
            composer.add(adapter, weight, name=adapter.meta.name)
        want.append(pipe(prompt, generator=generators(seeds), **call).images)
        composer.clear()
    with MixedAdapters(pipe, sets, images_per_prompt=2), torch.no_grad():
        got = pipe(PROMPTS[:2], generator=generators([1, 2, 3, 4]), **call).images
        with pytest.raises(MixedBatchError, match="1 rows for 2 prompts x 2 images"):
            pipe(PROMPTS[0], **call | {"num_images_per_prompt": 1})  # a call the batch does not describe
    assert np.abs(got - np.concatenate(want)).max() < 1e-4
    assert np.abs(want[0] - want[1]).max() > 0.05  # the sets make different images
    assert hooks_left(pipe) == 0
