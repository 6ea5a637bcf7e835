"""The CLI surface of the foundation: --version, --help, inspect, and errors as clean messages."""

from __future__ import annotations

from click.testing import CliRunner

from difflora import __version__
from difflora.cli import cli
from difflora.formats.native import save_adapter
from tests.support.adapters import trained_adapter
from tests.support.models import tiny_pipeline


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0 and "inspect" in result.output


def test_inspect_prints_the_facts(tmp_path):
    path = save_adapter(trained_adapter(tiny_pipeline(tmp_path)), tmp_path / "style.safetensors")
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "difflora native" in out
    assert "custom-abc" in out and "0123" in out  # base architecture and hash
    assert "zebrastripes" in out
    # 7 tiny-UNet transformer blocks (1+1 down, mid, 2+2 up) x 2 attentions x 4 projections; 2 TE layers x 4
    assert "unet             56 modules  rank 4  alpha 2.0" in out
    assert "text_encoder      8 modules  rank 2  alpha 6.0" in out
    assert 'name = "style"' in out  # the stored configuration


def test_inspect_json(tmp_path):
    import json

    path = save_adapter(trained_adapter(tiny_pipeline(tmp_path)), tmp_path / "style.safetensors")
    result = CliRunner().invoke(cli, ["inspect", "--json", str(path)])
    facts = json.loads(result.output)
    assert facts["modules"] == 64 and facts["components"]["unet"]["rank"] == 4


def test_library_error_is_one_clean_line_and_nonzero_exit(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"garbage")
    result = CliRunner().invoke(cli, ["inspect", str(bad)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output
    debug = CliRunner().invoke(cli, ["--debug", "inspect", str(bad)])
    assert debug.exit_code != 0 and debug.exception is not None  # --debug lets the traceback through
