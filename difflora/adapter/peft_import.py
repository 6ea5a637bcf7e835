"""peft without its eager bitsandbytes import: seven seconds off every command that does not quantize.

`import peft` runs `peft/helpers.py`, which imports bitsandbytes at module level (the rest of peft imports it
only when a quantized layer is adapted: "avoid eager bnb import" in its LoRA dispatch). Importing
bitsandbytes 0.50 wraps its kernels in `torch.compile`, which loads TorchDynamo and Inductor: measured 7 s
of CPU on a 2-core EPYC (import torch alone: 3-4 s), paid by every `difflora train/generate/merge/...`
before any work, and it is also what makes the `kernels` package speak on offline machines (chatter.py).

`install()` (called by `import difflora`, costing only a finder on `sys.meta_path`) wraps peft's loader
the first time peft is imported: while peft's top level runs, `import bitsandbytes` raises ImportError (so
peft.helpers keeps `bnb = None`, used only by its dequantizing helper, which difflora does not call);
afterwards bitsandbytes imports normally and peft's `is_bnb_available()` caches are cleared, so
`--quantize-base int8|nf4` gets peft's bitsandbytes LoRA layers exactly as before. Where bitsandbytes was
imported before peft, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import ModuleType

BITSANDBYTES = "bitsandbytes"


class _PeftLoader(importlib.abc.Loader):
    """peft's own loader, run with bitsandbytes hidden."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        hide = BITSANDBYTES not in sys.modules
        if hide:
            sys.modules[BITSANDBYTES] = None  # type: ignore[assignment]  # `import` raises ImportError
        try:
            self.loader.exec_module(module)
        finally:
            if hide and BITSANDBYTES in sys.modules and sys.modules[BITSANDBYTES] is None:
                del sys.modules[BITSANDBYTES]
            _forget_bitsandbytes_answers()


def _forget_bitsandbytes_answers() -> None:
    """peft caches "is bitsandbytes installed?" (lru_cache); an answer given while it was hidden is wrong."""
    utils = sys.modules.get("peft.import_utils")
    for name in ("is_bnb_available", "is_bnb_4bit_available"):
        cached = getattr(utils, name, None)
        if cached is not None and hasattr(cached, "cache_clear"):
            cached.cache_clear()


class _PeftFinder(importlib.abc.MetaPathFinder):
    """Finds peft as the other finders do, then wraps its loader (once)."""

    def find_spec(self, name: str, path: object = None, target: object = None):
        if name != "peft":
            return None
        uninstall()
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _PeftLoader(spec.loader)
        return spec


def install() -> None:
    """Wrap peft's first import (no-op when peft is already imported or the finder is in place)."""
    if "peft" in sys.modules or any(isinstance(f, _PeftFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PeftFinder())


def uninstall() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftFinder)]
