"""The formats side of the model-family seam: what a file says about its family, how it is named and which
consumer rules apply all come from the family classes' declared facts, not from tables keyed by name."""

from __future__ import annotations

import pytest

from difflora.embedded import EMBEDDED_MODEL_DIR
from difflora.formats.consumers.diffusers import diffusers
from difflora.formats.family import family_from_metadata, family_from_prefixes, family_of
from difflora.formats.naming import READ_PREFIXES, UNET_PREFIX, flat, reference_table
from difflora.formats.reference import reference_families
from difflora.models.families import FALLBACK_FAMILY, checkpoint_families, families, family

SHIPPED = checkpoint_families()


@pytest.mark.parametrize("v_prediction", [False, True], ids=["epsilon", "v"])
@pytest.mark.parametrize("known", SHIPPED, ids=[f.name for f in SHIPPED])
def test_the_metadata_a_family_writes_reads_back_as_that_family(known, v_prediction):
    kohya = {
        "ss_base_model_version": known.kohya_version(v_prediction=v_prediction),
        "ss_v2": str(known.kohya_v2_flag),
    }
    modelspec = {"modelspec.architecture": known.modelspec(v_prediction=v_prediction)}
    assert family_from_metadata(kohya | modelspec) == known.name
    if known.kohya_version_prefixes:
        assert family_from_metadata(kohya) == known.name
    else:  # a variant kohya writes as its parent (Flux.1 schnell as "flux1"): only ModelSpec tells them apart
        parent = next(
            f for f in SHIPPED if f is not known and f.kohya_base_version == known.kohya_base_version
        )
        assert family_from_metadata(kohya) == parent.name
    assert family_from_metadata(modelspec) == known.name


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ({"ss_base_model_version": "sd_1.5"}, "sd1"),  # ai-toolkit
        ({"ss_base_model_version": "sdxl_1.0"}, "sdxl"),  # ai-toolkit
        ({"ss_v2": "True"}, "sd2"),  # kohya before ss_base_model_version
        ({"difflora.base_family": "tiny", "ss_base_model_version": "sd_v1"}, "tiny"),  # own record first
        ({"ss_base_model_version": "flux1"}, "flux"),  # kohya's Flux.1 (dev and schnell)
        ({"ss_base_model_version": "sd3"}, None),
        ({}, None),
    ],
)
def test_foreign_metadata_spellings_name_the_family(metadata, expected):
    assert family_from_metadata(metadata) == expected


def test_only_a_text_encoder_prefix_one_family_writes_names_the_family():
    two_encoders = ["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_mid_block_x"]
    assert family_from_prefixes(two_encoders) == "sdxl"
    assert family_from_prefixes(["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]) is None
    assert family_from_prefixes(["lora_unet_mid_block_attentions_0_proj_in"]) is None


def test_an_unknown_or_missing_record_is_the_fallback_family():
    assert family_of("").name == family_of(None).name == family_of("flux-dev").name == FALLBACK_FAMILY
    assert family_of("sd2") is family("sd2")


def test_every_family_prefix_is_read():
    for known in families():
        for component, prefix in known.kohya_text_encoder_prefixes.items():
            assert READ_PREFIXES[prefix] == component
    assert READ_PREFIXES[UNET_PREFIX] == "unet"


def test_the_embedded_model_is_a_reference_from_its_own_folder():
    installed = (EMBEDDED_MODEL_DIR / "unet" / "config.json").is_file()
    assert ("tiny" in reference_families()) == installed
    if installed:
        assert reference_table("tiny").modules  # built from the embedded model's own configs


@pytest.mark.parametrize("name", [f.name for f in SHIPPED])
def test_kohya_names_follow_the_declared_layout(name):
    known, table = family(name), reference_table(name)
    for key, kohya in table.to_kohya.items():
        component, _, path = key.partition(".")
        if component == "unet":
            written = table.sgm[key] if known.kohya_unet_names == "sgm" else path
            assert kohya == f"{UNET_PREFIX}_{flat(written)}"
        else:
            assert kohya == f"{known.kohya_text_encoder_prefixes[component]}_{flat(path)}"


def test_diffusers_maps_sgm_blocks_by_the_unets_own_layers_per_block():
    """diffusers' `_maybe_map_sgm_blocks_to_diffusers` numbers SGM blocks with the UNet config's
    layers_per_block: the embedded model has 1 (the SD bases 2), so its SGM-named keys still all load."""
    if "tiny" not in reference_families():
        pytest.skip("the embedded model's configs are not installed")
    table = reference_table("tiny")
    sgm = [table.sgm[key] for key in table.modules if key.startswith("unet.") and key.endswith(".to_q")]
    keys = [
        f"{UNET_PREFIX}_{flat(path)}.{part}"
        for path in sgm
        for part in ("lora_down.weight", "lora_up.weight")
    ]
    verdict = diffusers(keys, table)
    assert sgm and verdict.complete, verdict.dropped
