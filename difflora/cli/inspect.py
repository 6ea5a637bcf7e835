"""`difflora inspect FILE...`: what an adapter file is, what made it, and where it will load."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .ckpt/.pt/.bin files (unsafe).")
def inspect_command(files: tuple[Path, ...], as_json: bool, allow_pickle: bool) -> None:
    """Print format, base model, rank/alpha per component, targets, trigger words and the stored config.

    With several files, also print their composition report (per-layer overlap at weight 1 each)."""
    from difflora.formats.describe import adapter_facts_json, describe_adapter  # torch: not for --help
    from difflora.formats.read import load_adapter

    adapters = [load_adapter(path, allow_pickle=allow_pickle) for path in files]
    for index, (path, adapter) in enumerate(zip(files, adapters, strict=True)):
        if index:
            click.echo()
        click.echo(adapter_facts_json(adapter) if as_json else describe_adapter(adapter, path))
    if len(adapters) > 1 and not as_json:
        from difflora.composition.report import composition_report
        from difflora.config.spec import AdapterWeight

        click.echo()  # several files: how they would interact if composed at weight 1 each
        names = (
            [p.stem for p in files] if len({p.stem for p in files}) == len(files) else [str(p) for p in files]
        )
        pairs = [(AdapterWeight(n), a) for n, a in zip(names, adapters, strict=True)]
        click.echo(composition_report(pairs).text())
