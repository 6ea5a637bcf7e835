"""Measure how well the embedded model draws what its prompt says, and how fast it does it.

For every colour x shape x background prompt ("a red circle on a white background", 6 x 3 x 3 = 54
prompts) and each seed, generate one 64x64 image and measure it with difflora.embedded.signatures:
  colour: dominant foreground colour == prompt colour   (bar: >= 90% of images)
  shape:  fill-ratio shape class     == prompt shape    (bar: >= 70% of images)
Then time one image at 20 steps (batch 1, median of 5 after a warm-up) on this machine.

    python scripts/eval_embedded_model.py --seeds 4 --steps 20 --write-benchmarks
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from difflora.embedded import shapes, signatures  # noqa: E402

COLOUR_BAR = 0.90
SHAPE_BAR = 0.70


def prompts() -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, background) for every combination."""
    return [
        (f"a {c} {s} on a {b} background", c, s, b)
        for c in shapes.COLOURS
        for s in shapes.SHAPES
        for b in shapes.BACKGROUNDS
    ]


def generate(pipe, prompt: str, seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 images [len(seeds), 64, 64, 3]; seed i always gives the same image."""
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    out = pipe(
        prompt,
        num_images_per_prompt=len(seeds),
        generator=gens,
        num_inference_steps=steps,
        guidance_scale=guidance,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def evaluate(pipe, seeds: list[int], steps: int, guidance: float, subset: int | None = None) -> dict:
    """Colour and shape accuracy over all prompts (or the first `subset` of a fixed shuffle)."""
    cases = prompts()
    if subset is not None:
        order = np.random.default_rng(0).permutation(len(cases))[:subset]
        cases = [cases[i] for i in order]
    per_prompt, colour_ok, shape_ok, n = [], 0, 0, 0
    for prompt, colour, shape, _bg in cases:
        images = generate(pipe, prompt, seeds, steps, guidance)
        got_c = [signatures.dominant_colour(im) for im in images]
        got_s = [signatures.classify_shape(im) for im in images]
        colour_ok += sum(g == colour for g in got_c)
        shape_ok += sum(g == shape for g in got_s)
        n += len(images)
        per_prompt.append({"prompt": prompt, "colours": got_c, "shapes": got_s})
    return {
        "images": n,
        "colour_accuracy": colour_ok / n,
        "shape_accuracy": shape_ok / n,
        "steps": steps,
        "guidance": guidance,
        "seeds": seeds,
        "per_prompt": per_prompt,
    }


def time_one_image(pipe, steps: int, guidance: float, repeats: int = 5) -> float:
    """Median seconds for one 64x64 image at `steps` steps, batch 1, after one warm-up."""
    generate(pipe, "a red circle on a white background", [0], steps, guidance)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        generate(pipe, "a blue square on a black background", [i], steps, guidance)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (GPU), torch {torch.__version__}"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the '## Embedded model' section of BENCHMARKS.md, atomically."""
    text = path.read_text() if path.exists() else "# difflora benchmarks\n"
    pattern = re.compile(r"^## Embedded model\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _m: section, text)
        if pattern.search(text)
        else text.rstrip("\n") + "\n\n" + section
    )
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".BENCHMARKS.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=ROOT / "difflora" / "embedded" / "model")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--device", default="cpu", help="the timing is reported for this device")
    parser.add_argument("--json", type=Path, help="write the full result (per prompt) here")
    parser.add_argument("--write-benchmarks", action="store_true", help="update BENCHMARKS.md's section")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    result = evaluate(pipe, list(range(args.seeds)), args.steps, args.guidance)
    result["seconds_per_image"] = time_one_image(pipe, args.steps, args.guidance)
    result["machine"] = machine()
    result["eval_seconds"] = round(time.time() - t0, 1)
    result["passed"] = result["colour_accuracy"] >= COLOUR_BAR and result["shape_accuracy"] >= SHAPE_BAR
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_prompt"}, indent=2))
    if args.write_benchmarks:
        cmd = "python scripts/eval_embedded_model.py " + " ".join(sys.argv[1:])
        write_section(ROOT / "BENCHMARKS.md", benchmark_section(result, cmd))
    sys.exit(0 if result["passed"] else 1)


def benchmark_section(r: dict, cmd: str) -> str:
    return f"""## Embedded model

Prompt following of the embedded base model (`difflora/embedded/model/`), measured by
`scripts/eval_embedded_model.py`: every colour x shape x background prompt (54), {len(r["seeds"])} seeds each,
{r["steps"]} Euler steps, guidance {r["guidance"]}; measures from `difflora/embedded/signatures.py`.

| measure | result | bar |
| --- | --- | --- |
| dominant foreground colour == prompt colour | {r["colour_accuracy"]:.1%} of {r["images"]} | >= {COLOUR_BAR:.0%} |
| shape class (bbox fill ratio) == prompt shape | {r["shape_accuracy"]:.1%} of {r["images"]} | >= {SHAPE_BAR:.0%} |
| one 64x64 image, {r["steps"]} steps, batch 1 (median of 5) | {r["seconds_per_image"]:.3f} s | < 1 s |

Machine: {r["machine"]}. Whole evaluation: {r["eval_seconds"]} s.

Command: `{cmd}`
"""


if __name__ == "__main__":
    main()
