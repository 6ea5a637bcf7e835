"""`--adapters` spec parsing, finding adapters by name, and refusing adapters that do not fit the model."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest
import torch

from difflora.composition.composer import Composer, compose
from difflora.composition.find import UnknownAdapterError, find_adapter
from difflora.composition.fit import check_compatible
from difflora.config.spec import GRAMMAR, AdapterWeight, parse_adapter_weights
from difflora.errors import AdapterCompatibilityError, AdapterSpecError
from difflora.formats.native import save_adapter
from tests.support.adapters import random_adapter
from tests.support.models import tiny_pipeline, tiny_unet


def test_parse_defaults_negative_and_text_encoder_weights():
    specs = parse_adapter_weights("style:0.7,subject:-0.3:0.5, detail ,x:2:te=0.25")
    assert specs == [
        AdapterWeight("style", 0.7),
        AdapterWeight("subject", -0.3, 0.5),
        AdapterWeight("detail", 1.0),
        AdapterWeight("x", 2.0, 0.25),
    ]
    assert [s.text_encoder_weight for s in specs] == [0.7, 0.5, 1.0, 0.25]
    assert specs[1].weight_for("unet") == -0.3 and specs[1].weight_for("text_encoder_2") == 0.5


def test_parse_repeated_flags_paths_and_drive_letters():
    specs = parse_adapter_weights(["a:1", "./loras/b.safetensors:0.5", r"C:\loras\c.safetensors:0.2:0.1"])
    assert [s.name for s in specs] == ["a", "./loras/b.safetensors", r"C:\loras\c.safetensors"]
    assert specs[2].te_weight == 0.1
    assert parse_adapter_weights("") == [] and parse_adapter_weights([]) == []


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("style:abc", "abc"),
        ("style:1:2:3", "style:1:2:3"),
        (":0.5", ":0.5"),
        ("a,,b", "a,,b"),
        ("a,", "a,"),
        ("style:nan", "nan"),
        ("style:", "style:"),
    ],
)
def test_malformed_specs_show_the_grammar_and_the_bad_fragment(spec, fragment):
    with pytest.raises(AdapterSpecError) as error:
        parse_adapter_weights(spec)
    message = str(error.value)
    assert GRAMMAR in message and repr(fragment) in message


def test_the_same_adapter_twice_is_refused():
    with pytest.raises(AdapterSpecError, match="'style' appears twice"):
        parse_adapter_weights("style:0.5,subject,style:0.2")


def test_find_adapter_by_name_path_or_fail_with_closest_matches(tmp_path, pipeline):
    first, second = tmp_path / "one", tmp_path / "two"
    adapter = random_adapter(pipeline, seed=0, unet=("to_q",))
    save_adapter(adapter, first / "style.safetensors")
    save_adapter(adapter, second / "subject.safetensors")
    save_adapter(adapter, second / "style.safetensors")
    assert find_adapter("style", [first, second]) == first / "style.safetensors"
    assert find_adapter("subject", [first, second]) == second / "subject.safetensors"
    assert find_adapter(str(second / "style.safetensors"), []) == second / "style.safetensors"
    with pytest.raises(AdapterSpecError) as error:
        find_adapter("stlye", [first, second])
    assert "Closest: style" in str(error.value) and "subject, style" not in str(error.value)
    assert "Available adapters" in str(error.value) and "subject" in str(error.value)
    with pytest.raises(AdapterSpecError, match="no adapters were found"):
        find_adapter("style", [tmp_path / "empty"])


def test_adapter_for_another_architecture_is_refused_naming_both_models(pipeline):
    adapter = random_adapter(pipeline, seed=0, unet=("to_q",))
    adapter.meta.base_architecture, adapter.meta.base_model = "sdxl-0123456789ab", "stabilityai/sdxl-base"
    with pytest.raises(AdapterCompatibilityError) as error:
        check_compatible(adapter, pipeline, name="xl_style")
    message = str(error.value)
    assert "sdxl-0123456789ab" in message and "stabilityai/sdxl-base" in message
    assert pipeline._difflora_identity.architecture in message and "xl_style" in message


def test_adapter_whose_shapes_do_not_fit_is_refused_and_the_model_is_untouched(tmp_path, pipeline):
    other = tiny_pipeline(tmp_path / "other")
    other.unet = tiny_unet(cross_attention_dim=48)  # to_k/to_v of cross-attention take 48 inputs there
    foreign = random_adapter(other, seed=0, unet=("to_k",))
    foreign.meta.base_architecture = ""  # e.g. a kohya file: no identity, only shapes to go by
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    with pytest.raises(AdapterCompatibilityError) as error:
        compose(pipeline).add(foreign, name="foreign")
    message = str(error.value)
    assert "attn2.to_k: adapter 48->32, model 32->32" in message and "does not fit the model" in message
    assert all(torch.equal(v, before[k]) for k, v in pipeline.unet.state_dict().items())


def test_same_architecture_other_base_hash_is_a_warning(pipeline, caplog):
    adapter = random_adapter(pipeline, seed=0, unet=("to_q",))
    adapter.meta.base_hash = "ffffffffffffffff"
    with caplog.at_level(logging.WARNING, logger="difflora"):
        composer = compose(pipeline)
        composer.add(adapter, 0.5, name="drifted")
    assert "ffffffffffffffff" in caplog.text and "drifted" in caplog.text
    assert composer.warnings and [str(a) for a in composer.adapters] == ["drifted:0.5"]


def test_reweighting_an_adapter_that_is_not_composed_names_those_that_are(pipeline):
    composer = compose(pipeline)
    composer.add(random_adapter(pipeline, seed=0, unet=("to_q",)), name="style")
    with pytest.raises(AdapterSpecError, match=r"'subject' is not composed here \(composed: style\)"):
        composer.set_weights(parse_adapter_weights("subject:0.5"))


def test_an_adapter_set_below_the_cli_is_parsed_values_never_text(pipeline):
    composer = compose(pipeline)
    with pytest.raises(TypeError, match=r"parse_adapter_weights\('style:0.7'\)"):
        composer.set("style:0.7")
    with pytest.raises(TypeError, match="parse_adapter_weights"):
        composer.set_weights("style:0.7")
    assert composer.adapters == []


def test_a_pipeline_has_one_composition_whichever_composer_changes_it(pipeline):
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    compose(pipeline).add(random_adapter(pipeline, seed=0, unet=("to_q",)), 0.5, name="style")
    assert "_difflora_composer" not in vars(pipeline)  # nothing of the composer hangs on diffusers' object
    again = Composer(pipeline)  # takes the composition over, with the original weights it fused from
    assert [str(a) for a in again.adapters] == ["style:0.5"]
    again.clear()
    assert all(torch.equal(v, base[k]) for k, v in pipeline.unet.state_dict().items())


def test_a_composed_pipeline_is_freed_when_its_user_lets_it_go(tmp_path):
    pipe = tiny_pipeline(tmp_path)
    composer = compose(pipe)
    composer.add(random_adapter(pipe, seed=0, unet=("to_q",)), name="style")
    alive = weakref.ref(pipe)
    del pipe, composer
    gc.collect()
    assert alive() is None


def test_a_set_with_an_adapter_that_does_not_fit_is_refused_before_the_set_changes(tmp_path, pipeline):
    other = tiny_pipeline(tmp_path / "other")
    other.unet = tiny_unet(cross_attention_dim=48)
    adapters = {
        "style": random_adapter(pipeline, seed=0, unet=("to_q",)),
        "foreign": random_adapter(other, seed=1, unet=("to_k",)),
    }
    adapters["foreign"].meta.base_architecture = ""  # only its shapes tell it apart
    composer = compose(pipeline)
    composer.add(adapters["style"], 0.5, name="style")
    before = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    with pytest.raises(AdapterCompatibilityError):
        composer.set(parse_adapter_weights("foreign"), loader=lambda name: (adapters[name], None))
    assert [str(a) for a in composer.adapters] == ["style:0.5"]
    assert all(torch.equal(v, before[k]) for k, v in pipeline.unet.state_dict().items())


def test_a_server_finds_adapters_by_name_only_and_never_shows_its_folders(tmp_path, pipeline):
    save_adapter(random_adapter(pipeline, seed=0, unet=("to_q",)), tmp_path / "style.safetensors")
    assert find_adapter("style", [tmp_path], allow_paths=False) == tmp_path / "style.safetensors"
    for path in (str(tmp_path / "style.safetensors"), "../style", ".hidden", "C:style"):
        with pytest.raises(AdapterSpecError, match="not paths"):
            find_adapter(path, [tmp_path], allow_paths=False)
    with pytest.raises(UnknownAdapterError, match="Closest: style") as error:
        find_adapter("styel", [tmp_path], allow_paths=False)
    assert str(tmp_path) not in str(error.value)
