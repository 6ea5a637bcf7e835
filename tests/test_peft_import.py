"""difflora imports peft without bitsandbytes (difflora/adapter/peft_import.py): bitsandbytes' import loads
TorchDynamo and Inductor (seven seconds of CPU here) and is only needed for --quantize-base. Checked in a
fresh interpreter, since this test process has long imported both."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
import difflora.training.trainer, difflora.generation.generate, difflora.composition.composer
import peft, peft.import_utils as utils
loaded = {name: name in sys.modules for name in ("bitsandbytes", "torch._inductor.compile_fx", "peft")}
loaded["bnb_available"] = utils.is_bnb_available()
import bitsandbytes
from peft.tuners.lora import Linear8bitLt
loaded["peft_bnb_layer"] = Linear8bitLt.__module__
print(json.dumps(loaded))
"""


@pytest.mark.slow  # a fresh interpreter importing torch and diffusers: ~10 s
def test_commands_import_peft_without_bitsandbytes_and_quantizing_still_finds_it():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == {
        "bitsandbytes": False,
        "torch._inductor.compile_fx": False,
        "peft": True,
        "bnb_available": True,  # peft's cached answer was cleared after the hidden import
        "peft_bnb_layer": "peft.tuners.lora.bnb",
    }
