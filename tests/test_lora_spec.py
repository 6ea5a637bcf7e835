"""The LoRA settings of a run as one frozen `LoraSpec`: built once from the configuration with the model
family's defaults, and read the same way by plain LoRA and AdaLoRA injection."""

from __future__ import annotations

import dataclasses

import pytest

from difflora.adapter.adaptive import add_adalora
from difflora.adapter.inject import add_lora
from difflora.adapter.spec import CONV_TARGETS, TEXT_ENCODER_TARGETS, UNET_TARGETS, LoraSpec
from difflora.config.train import TrainConfig
from difflora.models.families import families
from tests.support.models import tiny_text_encoder, tiny_unet


def test_the_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        LoraSpec(rank=4, alpha=4).rank = 8  # type: ignore[misc]


def test_empty_targets_mean_each_components_defaults_and_locon_adapts_only_the_unet():
    spec = LoraSpec(rank=4, alpha=4, conv_rank=2)
    assert spec.targets("unet") == (*UNET_TARGETS, *CONV_TARGETS)
    assert spec.targets("text_encoder") == TEXT_ENCODER_TARGETS
    assert spec.conv_patterns("unet") == (dict.fromkeys(CONV_TARGETS, 2), dict.fromkeys(CONV_TARGETS, 2.0))
    assert spec.conv_patterns("text_encoder_2") == ({}, {})
    assert LoraSpec(rank=4, alpha=4, conv_rank=2, conv_alpha=1).conv_patterns("unet")[1]["conv1"] == 1.0


@pytest.mark.parametrize("family", families(), ids=lambda f: f.name)
def test_the_config_builds_the_spec_with_the_familys_defaults(family):
    config = TrainConfig(data_dir="x", rank=8, alpha=4, rslora=True, dora=True, conv_rank=2)
    spec = config.lora_spec(family)
    assert (spec.rank, spec.alpha, spec.rslora, spec.dora, spec.conv_rank) == (8, 4.0, True, True, 2)
    assert spec.unet_targets == family.default_unet_targets and spec.adaptive_init_rank is None
    chosen = TrainConfig(data_dir="x", rank=8, unet_targets=("to_q",), adaptive_rank=True).lora_spec(family)
    assert chosen.unet_targets == ("to_q",) and chosen.adaptive_init_rank == 12  # 1.5 x rank


def test_plain_and_adaptive_injection_read_the_same_spec():
    spec = LoraSpec(rank=2, alpha=4, unet_targets=("to_q",), adaptive_init_rank=3)
    plain = add_lora(tiny_unet(), "unet", spec)
    adaptive, _ = add_adalora(tiny_unet(), "unet", spec)
    assert plain == adaptive and all(name.endswith("to_q") for name in plain)
    assert add_lora(tiny_text_encoder(), "text_encoder", spec)  # the text encoder's own defaults
