"""Extract the real Qwen2 / Qwen2.5 byte-level BPE (the tokenizer of Qwen2.5-VL-7B, Qwen-Image's text encoder)
from a PyPI package that carries it, and write it as the published tokenizer folder (`vocab.json`,
`merges.txt`, `tokenizer_config.json`).

No model hub is reachable. stable-diffusion.cpp embeds Qwen2's 151,387 BPE merges as a byte array
(`qwen2_merges_utf8_c_str` in `src/tokenizers/vocab/qwen.hpp`), and its Python binding's source distribution
vendors it (the same package the T5 tokenizer came from, `scripts/build_t5_tokenizer.py`):

    pip download --no-deps --no-binary=stable-diffusion-cpp-python stable-diffusion-cpp-python==0.4.7 -d /tmp/x
    python scripts/build_qwen_tokenizer.py /tmp/x/stable_diffusion_cpp_python-0.4.7.tar.gz \
        --out difflora/models/architectures/qwen-image/tokenizer

A byte-level BPE's vocabulary follows from its merges: the 256 byte symbols in GPT-2's byte-to-unicode order
(ids 0-255), then each merge's result in merge order (ids 256-151,642), as Qwen2's published `vocab.json` is
laid out (and as stable-diffusion.cpp rebuilds it). The special tokens (151,643-151,664) are Qwen2.5-VL's.
`tests/test_qwen_image_tokenizer.py` checks the result against ids published by independent sources.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

MEMBER_SUFFIX = "src/tokenizers/vocab/qwen.hpp"
ARRAY = "qwen2_merges_utf8_c_str"
MERGES = 151_387
SPECIAL = (  # Qwen2.5-VL's added tokens from 151643 on; the first 14 are special (skipped when decoding)
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
SPECIAL_COUNT = 14
FIRST_SPECIAL = 151_643  # after the 256 byte symbols and the merges


def header_text(archive: Path) -> str:
    """The vendored header that embeds the merges, read from the source distribution."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER_SUFFIX)), None)
        if member is None:
            raise SystemExit(f"{archive} has no {MEMBER_SUFFIX}: pass stable-diffusion-cpp-python's sdist")
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read().decode("ascii")


def embedded_merges(header: str) -> list[str]:
    """The bytes of `static const unsigned char qwen2_merges_utf8_c_str[] = { ... };`: one merge a line."""
    start = header.index(ARRAY)
    body = header[header.index("{", start) + 1 : header.index("};", start)]
    data = bytes(int(token, 16) for token in re.findall(r"0x([0-9a-fA-F]+)", body))
    return [line for line in data.rstrip(b"\0").decode("utf-8").split("\n") if line]


def byte_symbols() -> list[str]:
    """GPT-2's byte-to-unicode table in id order: printable Latin-1 bytes stand for themselves, the others
    map to code points from 256 on, in byte order."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + n) for n in range(len(moved))]


def vocabulary(merges: list[str]) -> dict[str, int]:
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols())}
    for merge in merges:
        left, right = merge.split(" ")
        if left + right in vocab:
            raise SystemExit(f"merge {merge!r} repeats a token: not a Qwen2 merge list")
        vocab[left + right] = len(vocab)
    return vocab


def tokenizer_config() -> dict:
    """Qwen2.5-VL's published settings: no BOS, `<|im_end|>` ends, `<|endoftext|>` pads."""
    decoder = {
        str(FIRST_SPECIAL + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": i < SPECIAL_COUNT,
        }
        for i, token in enumerate(SPECIAL)
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    merges = embedded_merges(header_text(args.sdist))
    if len(merges) != MERGES:
        raise SystemExit(f"{len(merges)} merges, not Qwen2's {MERGES}")
    vocab = vocabulary(merges)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    (args.out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    config = json.dumps(tokenizer_config(), indent=2)
    (args.out / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
