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
from PIL import Image

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


def signature_report(pipe, steps: int, guidance: float, n_captions: int = 8) -> dict:
    """Sample concepts' signatures: in the sample images, and in base generations of their captions."""
    report = {}
    for folder, name, measure in (
        ("style", "stripe_energy", signatures.stripe_energy),
        ("subject", "cross_score", signatures.cross_score),
    ):
        pngs = sorted((ROOT / "sample_data" / folder).glob("*.png"))
        sample = [measure(np.asarray(Image.open(p).convert("RGB"))) for p in pngs]
        base = [
            measure(im)
            for p in pngs[:n_captions]
            for im in generate(pipe, p.with_suffix(".txt").read_text().strip(), [0], steps, guidance)
        ]
        report[folder] = {
            "measure": name,
            "sample_min": min(sample),
            "sample_median": float(np.median(sample)),
            "base_max": max(base),
            "base_median": float(np.median(base)),
        }
    return report


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


def model_megabytes() -> float:
    model = ROOT / "difflora" / "embedded" / "model"
    return sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 2**20


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
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="the timing is reported for this device")
    parser.add_argument("--json", type=Path, help="write the full result (per prompt) here")
    parser.add_argument("--write-benchmarks", action="store_true", help="update BENCHMARKS.md's section")
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    if args.threads:
        # On a shared machine, 2 spinning OpenMP threads per process slow down several-fold.
        torch.set_num_threads(args.threads)
    t0 = time.time()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    result = evaluate(pipe, list(range(args.seeds)), args.steps, args.guidance)
    result["signatures"] = signature_report(pipe, args.steps, args.guidance)
    result["load_average_1min"] = round(os.getloadavg()[0], 2)  # other jobs on the machine during timing
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
    t = json.loads((ROOT / "difflora" / "embedded" / "pretraining_report.json").read_text())
    sig = r["signatures"]
    return f"""## Embedded model

A tiny SD 1.x trained from scratch (`scripts/pretrain_embedded_model.py`, {t["device"]}, {t["date"]}):
UNet {t["params"]["unet"] / 1e6:.2f} M params, CLIP text encoder {t["params"]["text_encoder"] / 1e6:.2f} M
(real 49,408-token vocabulary, {t["max_tokens"]} tokens), VAE {t["params"]["vae"] / 1e6:.2f} M;
latents {"x".join(map(str, t["latents"]))}; fp16 on disk, {model_megabytes():.1f} MB.

| stage | steps x batch | time | result |
| --- | --- | --- | --- |
| VAE | {t["vae"]["steps"]} x {t["vae"]["batch"]} | {t["vae"]["seconds"]:.0f} s | PSNR held-out {t["vae"]["psnr_db_base_heldout"]:.1f} dB, stripes {t["vae"]["psnr_db_style_stripes"]:.1f} dB, crosses {t["vae"]["psnr_db_subject_cross"]:.1f} dB (bar 28); scaling_factor {t["vae"]["scaling_factor"]} |
| text encoder + UNet | {t["text_encoder_unet"]["steps"]} x {t["text_encoder_unet"]["batch"]} | {t["text_encoder_unet"]["seconds"]} s | min-SNR-5 loss {t["text_encoder_unet"]["final_loss_min_snr5"]} |

Commands: `{"`; `".join(t["commands"])}`.

Sample concepts' signatures (`sample_data/`, thresholds in `difflora/embedded/signatures.py`); "base" = the
base model prompted with the first 8 sample captions, trigger words included, seed 0:

| concept | measure | threshold | sample images min / median | base generations median / max |
| --- | --- | --- | --- | --- |
| style (stripes) | stripe energy | {signatures.STRIPE_THRESHOLD} | {sig["style"]["sample_min"]:.3f} / {sig["style"]["sample_median"]:.3f} | {sig["style"]["base_median"]:.3f} / {sig["style"]["base_max"]:.3f} |
| subject (cross) | cross score | {signatures.CROSS_THRESHOLD} | {sig["subject"]["sample_min"]:.3f} / {sig["subject"]["sample_median"]:.3f} | {sig["subject"]["base_median"]:.3f} / {sig["subject"]["base_max"]:.3f} |

Prompt following of the embedded base model (`difflora/embedded/model/`), measured by
`scripts/eval_embedded_model.py`: every colour x shape x background prompt (54), {len(r["seeds"])} seeds each,
{r["steps"]} Euler steps, guidance {r["guidance"]}; measures from `difflora/embedded/signatures.py`.

| measure | result | bar |
| --- | --- | --- |
| dominant foreground colour == prompt colour | {r["colour_accuracy"]:.1%} of {r["images"]} | >= {COLOUR_BAR:.0%} |
| shape class (bbox fill ratio) == prompt shape | {r["shape_accuracy"]:.1%} of {r["images"]} | >= {SHAPE_BAR:.0%} |
| one 64x64 image, {r["steps"]} steps, batch 1 (median of 5) | {r["seconds_per_image"]:.3f} s | < 1 s |

Machine: {r["machine"]}; 1-minute load average {r["load_average_1min"]} when the timing started
(the machine is shared: other jobs slow the timing). Whole evaluation: {r["eval_seconds"]} s.

Command: `{cmd}`
"""


if __name__ == "__main__":
    main()
