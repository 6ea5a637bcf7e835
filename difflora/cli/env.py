"""`difflora env`: versions, torch's build, devices and cache folders, to paste into a bug report."""

from __future__ import annotations

import click


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def env_command(as_json: bool) -> None:
    """Print difflora's, torch's and the libraries' versions, torch's build, the devices with their memory
    and half-precision support, the thread count and the cache folders."""
    from difflora.models.environment import environment  # torch: not for --help

    report = environment()
    click.echo(report.json() if as_json else report.text())
