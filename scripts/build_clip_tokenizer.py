"""Derive the real CLIP BPE tokenizer files (vocab.json, merges.txt) from OpenAI's published vocabulary.

No model hub is reachable, so the embedded model's tokenizer is rebuilt from the file
`clip/bpe_simple_vocab_16e6.txt.gz` that ships in the PyPI package clip-anytorch:

    pip download --no-deps clip-anytorch -d /tmp/x
    python scripts/build_clip_tokenizer.py /tmp/x/clip_anytorch-*.whl --out difflora/embedded/model/tokenizer

The construction mirrors OpenAI CLIP's `SimpleTokenizer` (and the Hugging Face openai/clip-vit-* files):
256 byte symbols, the same with the end-of-word marker `</w>`, the first 48,894 merges, then
`<|startoftext|>` and `<|endoftext|>`: 49,408 tokens in all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import zipfile
from pathlib import Path

BPE_MEMBER = "clip/bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer
VOCAB_SIZE = 49408


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def read_bpe_lines(source: Path) -> list[str]:
    """Lines of the gzipped BPE file, read from the .gz itself or from inside the clip-anytorch wheel."""
    if source.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(source) as zf:
            raw = gzip.decompress(zf.read(BPE_MEMBER))
    else:
        raw = gzip.decompress(source.read_bytes())
    return raw.decode("utf-8").split("\n")


def build(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """Return (vocab, merges) exactly as CLIP's SimpleTokenizer builds them."""
    merges = lines[1 : N_MERGES + 1]
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    vocab_list += ["".join(m.split(" ")) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    if len(vocab_list) != VOCAB_SIZE:
        raise SystemExit(
            f"expected {VOCAB_SIZE} tokens, built {len(vocab_list)}: is this the right BPE file?"
        )
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; package data must be world-readable
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="clip-anytorch wheel, or bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, default=Path("difflora/embedded/model/tokenizer"))
    args = parser.parse_args()
    vocab, merges = build(read_bpe_lines(args.source))
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    write_atomic(args.out / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    print(f"wrote {len(vocab)} tokens and {len(merges)} merges to {args.out}")


if __name__ == "__main__":
    main()
