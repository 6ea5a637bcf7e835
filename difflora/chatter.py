"""Third-party log lines that tell a difflora user nothing, silenced at their source.

Each entry names the logger and the start of the one message it drops, and says why that message is
harmless here. A filter on the emitting logger drops just that message, for the CLI and the Python API
alike; everything else those libraries log still reaches the user (the CLI lowers their levels further).
Installed when `difflora` is imported: it touches `logging` only, so `import difflora` stays cheap.
"""

from __future__ import annotations

import logging
import re
import warnings

# logger name -> message prefixes it drops
KNOWN_CHATTER: dict[str, tuple[str, ...]] = {
    # Importing bitsandbytes (for --quantize-base; peft no longer pulls it in: adapter/peft_import.py), whose CPU backend (on CPUs with AVX512-BF16) asks the `kernels`
    # package for an optional 4-bit matmul kernel from the Hugging Face Hub at import time. In offline mode
    # (HF_HUB_OFFLINE=1, as difflora's own scripts run) kernels says so on every command, and bitsandbytes
    # then says the kernel is missing and falls back to its own CPU path: difflora needs nothing more, since
    # --quantize-base runs on that path (or on CUDA) either way.
    "kernels._internals.hf_hub": ("Skipping publisher trust check",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    # Loading an SDXL or Flux pipeline makes diffusers look up transformers' image processor classes (for
    # the IP-Adapter components difflora leaves out). Without torchvision, which the install leaves out on
    # purpose (PyPI's build breaks `import transformers` beside the CPU torch), transformers says once per
    # class that it falls back to the PIL implementation: the one that is used either way, and never by
    # difflora, which gives no pipeline an image encoder.
    "transformers.utils.import_utils": (
        "`CLIPImageProcessor` requires torchvision",
        "`SiglipImageProcessor` requires torchvision",
    ),
    # The first loss plot on a machine (training/log.py draws loss.png with matplotlib) makes matplotlib
    # scan the system fonts once and cache the list in its config folder; it says so, and says the scan
    # may take a moment when it does. Both are about matplotlib's own cache, which the user never asked
    # for and need not act on: the plot is drawn the same either way.
    "matplotlib.font_manager": ("generated new fontManager", "Matplotlib is building the font cache"),
}


# (warning category, start of the message) of warnings dropped the same way
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # diffusers' own ChromaTransformer2DModel builds its rotary embedding from a class diffusers has since
    # deprecated (`FluxPosEmbed` imported from `diffusers.models.embeddings`), so building one (loading a
    # Chroma model, or the meta-device reference tree that `export` and `inspect` read key rules from) says
    # so: a note to diffusers' authors about their own module, nothing the user calls or can change.
    (FutureWarning, "`FluxPosEmbed` is deprecated"),
)


class _DropMessages(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def silence_known_chatter() -> None:
    """Attach the filters (once per logger, however often this is called) and the warning filters (which
    `warnings` keeps once however often they are added)."""
    for name, prefixes in KNOWN_CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(prefixes))
    for category, start in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
