"""The shipped Qwen2 / Qwen2.5-VL tokenizer (difflora/models/architectures/qwen-image/tokenizer, built by
scripts/build_qwen_tokenizer.py from the merges stable-diffusion-cpp-python vendors) against token ids that
public projects publish for the real tokenizer, written down here from those sources, not computed:

- ChatML's default system turn, `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n`
  -> 151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198 (the prompt ids of
  Qwen2.5 serving benchmarks and tests in several repositories);
- "Hello, world! 123" -> 9707, 11, 1879, 0, 220, 16, 17, 18; "the cat sat on the mat" -> 1782, 8251, 7578, 389,
  279, 5517; "こんにちは世界" -> 89015, 99489 (a Rust port's tests of the Qwen2 tokenizer);
- Qwen2.5-VL's special tokens from 151643 (`<|endoftext|>`) to 151664 (`<|file_sep|>`), `<|vision_start|>`
  151652, `<|image_pad|>` 151655.

And Qwen-Image's own fact: QwenImagePipeline drops the first 34 tokens of its prompt template, which must be
exactly the template's prefix before the caption.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from difflora.models.families import family
from difflora.models.families.qwen_image import PROMPT_TEMPLATE, TEMPLATE_TOKENS
from tests.support.paths import REPO_ROOT


def _build_script():
    """scripts/build_qwen_tokenizer.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        "build_qwen_tokenizer", REPO_ROOT / "scripts" / "build_qwen_tokenizer.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = _build_script()

PUBLISHED = {
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n": [
        151644,
        8948,
        198,
        2610,
        525,
        264,
        10950,
        17847,
        13,
        151645,
        198,
        151644,
        872,
        198,
    ],
    "Hello, world! 123": [9707, 11, 1879, 0, 220, 16, 17, 18],
    "the cat sat on the mat": [1782, 8251, 7578, 389, 279, 5517],
    "こんにちは世界": [89015, 99489],
}


@pytest.fixture(scope="module")
def tokenizer():
    return family("qwen-image").own_tokenizer("tokenizer")


@pytest.mark.parametrize("text", list(PUBLISHED))
def test_published_ids(tokenizer, text: str) -> None:
    assert tokenizer(text).input_ids == PUBLISHED[text]


def test_special_tokens(tokenizer) -> None:
    assert len(tokenizer) == 151643 + 22
    assert tokenizer.convert_tokens_to_ids(
        ["<|endoftext|>", "<|vision_start|>", "<|image_pad|>", "<|file_sep|>"]
    ) == [
        151643,
        151652,
        151655,
        151664,
    ]
    assert (tokenizer.pad_token_id, tokenizer.eos_token) == (151643, "<|im_end|>")
    assert tokenizer.decode([9707, 11, 1879, 0]) == "Hello, world!"


def test_pipeline_drops_exactly_the_template_prefix(tokenizer) -> None:
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    assert pipe.prompt_template_encode == PROMPT_TEMPLATE
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_TOKENS
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == TEMPLATE_TOKENS
    whole = tokenizer(PROMPT_TEMPLATE.format("a red stripe")).input_ids
    assert whole[:TEMPLATE_TOKENS] == tokenizer(prefix).input_ids
    assert whole[TEMPLATE_TOKENS : TEMPLATE_TOKENS + 3] == tokenizer("a red stripe").input_ids


def test_shipped_vocabulary_follows_from_the_merges() -> None:
    """vocab.json is the 256 byte symbols then each merge's result in merge order, ids 0-151642, as the build
    script derives it; the added tokens follow."""
    folder = family("qwen-image").config_dir() / "tokenizer"
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    shipped = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(merges) == 151_387
    assert list(shipped)[:256] == BUILD.byte_symbols()
    assert shipped == BUILD.vocabulary(merges)
    assert max(shipped.values()) + 1 == BUILD.FIRST_SPECIAL
    config = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = config["added_tokens_decoder"]
    assert [decoder[str(BUILD.FIRST_SPECIAL + i)]["content"] for i in range(len(BUILD.SPECIAL))] == list(
        BUILD.SPECIAL
    )
