"""Extract the real T5 v1.1 tokenizer (the SentencePiece unigram model of google/t5-v1_1-xxl, as Flux.1's
`tokenizer_2` uses it) from a PyPI package that carries it, and write it as a Hugging Face `tokenizer.json`.

No model hub is reachable. stable-diffusion.cpp embeds the T5 tokenizer's `tokenizer.json` as a byte array
(`t5_tokenizer_json_str` in `src/tokenizers/vocab/clip_t5.hpp`), and its Python binding's source
distribution vendors it:

    pip download --no-deps --no-binary=stable-diffusion-cpp-python stable-diffusion-cpp-python==0.4.7 -d /tmp/x
    python scripts/build_t5_tokenizer.py /tmp/x/stable_diffusion_cpp_python-0.4.7.tar.gz \
        --out difflora/models/architectures/flux1-dev/tokenizer_2

The file is checked before it is written: a unigram model of 32,000 pieces plus the 100 `<extra_id_N>`
sentinels (32,100 tokens), `<pad>` = 0, `</s>` = 1, `<unk>` = 2, as T5TokenizerFast expects.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from pathlib import Path

MEMBER_SUFFIX = "src/tokenizers/vocab/clip_t5.hpp"
ARRAY = "t5_tokenizer_json_str"
VOCAB_SIZE = 32100


def header_text(archive: Path) -> str:
    """The vendored header that embeds the tokenizer, read from the source distribution."""
    with tarfile.open(archive) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(MEMBER_SUFFIX)), None)
        if member is None:
            raise SystemExit(f"{archive} has no {MEMBER_SUFFIX}: pass stable-diffusion-cpp-python's sdist")
        handle = tar.extractfile(member)
        assert handle is not None
        return handle.read().decode("ascii")


def embedded_json(header: str) -> dict:
    """The bytes of `static const unsigned char t5_tokenizer_json_str[] = { ... };` parsed as JSON."""
    start = header.index(ARRAY)
    body = header[header.index("{", start) + 1 : header.index("};", start)]
    data = bytes(int(token, 0) for token in re.findall(r"0x[0-9a-fA-F]+|\d+", body))
    return json.loads(data.rstrip(b"\0").decode("utf-8"))


def check(tokenizer: dict) -> None:
    model = tokenizer["model"]
    pieces = [piece for piece, _ in model["vocab"]]
    added = [token["content"] for token in tokenizer.get("added_tokens", [])]
    total = len(set(pieces) | set(added))
    if model["type"] != "Unigram" or total != VOCAB_SIZE or pieces[:3] != ["<pad>", "</s>", "<unk>"]:
        raise SystemExit(f"unexpected tokenizer: {model['type']}, {total} tokens, first {pieces[:3]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sdist", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    tokenizer = embedded_json(header_text(args.sdist))
    check(tokenizer)
    args.out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":"))
    (args.out / "tokenizer.json").write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
