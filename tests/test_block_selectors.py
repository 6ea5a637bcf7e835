"""A block selector naming no block of the model (a typo such as `otu=0`, or a block its family lacks) is
refused in one line naming it and the model's valid selectors, in generate's composer and in merge; never a
silent factor 1."""

from __future__ import annotations

import pytest
import torch

from difflora.composition.blocks import model_blocks
from difflora.composition.composer import Composer
from difflora.composition.merge import merge_adapters
from difflora.config.spec import parse_adapter_weights
from difflora.errors import AdapterSpecError
from difflora.formats.reference import reference_model
from difflora.models.families import family as model_family
from tests.support.adapters import base_weights, random_adapter
from tests.support.formats import synthetic_adapter

# The valid selectors by hand: SDXL's UNet has input_blocks 0-8, a middle block and output_blocks 0-8 (its
# SGM layout: conv_in, then 3 levels of 2 layers + a downsampler but the last); SD 1.x's 0-11 of each; Flux.1
# dev has 19 double-stream and 38 single-stream blocks.
SDXL = "base, in, mid, out, IN00-08, OUT00-08"
SD1 = "base, in, mid, out, IN00-11, OUT00-11"
FLUX = "base, clip, double, in, out, single, t5, DOUBLE0-18, SINGLE0-37"  # IN/OUT: embedders, final layer


def blocks_of(family: str) -> set[str]:
    declared = model_family(family)
    return model_blocks(reference_model(family, declared.denoiser), declared)


def refusal(spec: str, family: str) -> str:
    (entry,) = parse_adapter_weights(spec)
    with pytest.raises(AdapterSpecError) as error:
        entry.blocks.check(blocks_of(family), family)
    return str(error.value)


@pytest.mark.parametrize(
    ("spec", "family", "selector", "valid"),
    [
        ("a@otu=0", "sdxl", "otu", SDXL),
        ("a@out=1,IN09=0", "sdxl", "IN09", SDXL),  # SD 1.x has IN09; SDXL stops at IN08
        ("a@double3=0", "sdxl", "double3", SDXL),
        ("a@mid=0", "flux", "mid", FLUX),
        ("a@IN04=0", "flux", "IN04", FLUX),
        ("a@clip=0,t5=1", "sdxl", "clip", SDXL),
        ("a@" + ",".join(["1"] * 61), "sd1", "@" + ",".join(["1"] * 61), SD1),  # Flux's vector on a UNet
        ("a@double=1,single38=0", "flux", "single38", FLUX),
        ("a@singel=0", "flux", "singel", FLUX),
        ("a@mid0=1", "sd1", "mid0", SD1),
        ("a@OUTALL", "flux", "@OUTALL", FLUX),  # a UNet vector on a DiT names none of its blocks
    ],
)
def test_unknown_selector_is_refused_in_one_line_naming_it_and_the_valid_ones(spec, family, selector, valid):
    text = refusal(spec, family)
    assert (
        text == f"Block selector {selector!r} names no block of this {family} model; its selectors: {valid}."
    )


@pytest.mark.parametrize(
    ("spec", "family"),
    [
        ("a@IN09=0,OUT11=1,M00=0.5,base=0", "sd1"),
        ("a@in=0,IN08=1,mid=2,OUT00-08=0.5", "sdxl"),
        ("a@IN05-12=0", "sdxl"),  # a range reaching past the last block still names IN05-IN08
        ("a@double0-18=0,single=0.5,SINGLE37=1,base=0", "flux"),
        ("a@in=0,out=2,clip=0,T5=1", "flux"),
        ("a@" + ",".join(["1"] * 26), "sdxl"),  # the 26-vector names IN09-IN11 too: each module takes its own
    ],
)
def test_selectors_the_model_has_are_accepted(spec, family):
    (entry,) = parse_adapter_weights(spec)
    entry.blocks.check(blocks_of(family), family)


def test_generate_s_composer_refuses_before_composing_anything(pipeline):
    """The tiny UNet (a custom family; conv_in IN00, 2 levels of 1 layer + a downsampler but the last: IN00-03;
    2 up levels of 2 layers: OUT00-03): OUT04 is refused; the weights stay W0 bit for bit."""
    adapter = random_adapter(pipeline, seed=1, unet=("to_q",), name="s")
    composer = Composer(pipeline, "fused")
    before = {key: value.clone() for key, value in base_weights(pipeline).items()}
    specs = parse_adapter_weights("s:1@out=1,OUT04=0")
    tiny = "base, in, mid, out, IN00-03, OUT00-03"
    with pytest.raises(
        AdapterSpecError,
        match=f"^Block selector 'OUT04' names no block of this custom model; its selectors: {tiny}.$",
    ):
        composer.set(specs, loader=lambda name: (adapter, None))
    assert all(torch.equal(value, before[key]) for key, value in base_weights(pipeline).items())
    composer.set(parse_adapter_weights("s:1@out=1"), loader=lambda name: (adapter, None))
    with pytest.raises(AdapterSpecError, match="'otu' names no block"):
        composer.set_weights(parse_adapter_weights("s:1@otu=0"))


def test_merge_refuses_a_selector_the_family_lacks():
    adapter = synthetic_adapter("sdxl", rank=2, select=lambda path: path.endswith("attn1.to_q"))
    (spec,) = parse_adapter_weights("x:1@IN11=0")
    with pytest.raises(
        AdapterSpecError, match=f"'IN11' names no block of this sdxl model; its selectors: {SDXL}"
    ):
        merge_adapters([(spec, adapter)])
