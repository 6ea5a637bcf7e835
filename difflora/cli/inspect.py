"""`difflora inspect FILE...`: what an adapter file is, what made it, and where it will load."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("inspect")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickled .ckpt/.pt/.bin files (unsafe).")
@click.option(
    "--spectrum",
    is_flag=True,
    help="Print each layer's singular values, the rank keeping 90%/99% of its update, and the rank to merge to.",
)
@click.option(
    "--spectrum-map",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write a heat map PNG of energy per layer and component (one input file; implies --spectrum).",
)
def inspect_command(
    files: tuple[Path, ...], as_json: bool, allow_pickle: bool, spectrum: bool, spectrum_map: Path | None
) -> None:
    """Print format, base model, rank/alpha per component, targets, trigger words and the stored config.

    With several files, also print their composition report (per-layer overlap at weight 1 each)."""
    from difflora.formats.read import load_adapter  # torch: not for --help

    if spectrum_map is not None and len(files) != 1:
        raise click.UsageError("--spectrum-map draws one adapter: give one file, or leave it out.")
    adapters = [load_adapter(path, allow_pickle=allow_pickle) for path in files]
    if spectrum or spectrum_map is not None:
        _spectra(files, adapters, spectrum_map)
        return
    _facts(files, adapters, as_json)


def _spectra(files: tuple[Path, ...], adapters: list, spectrum_map: Path | None) -> None:
    from difflora.composition.spectrum import adapter_spectrum, spectrum_text

    for index, (path, adapter) in enumerate(zip(files, adapters, strict=True)):
        if index:
            click.echo()
        click.echo(f"Spectrum of {path}")
        click.echo(spectrum_text(adapter, str(path), path.stem))
    if spectrum_map is not None:
        from difflora.composition.spectrum_map import save_spectrum_map

        save_spectrum_map(adapter_spectrum(adapters[0]), spectrum_map)
        click.echo(f"Wrote {spectrum_map}")


def _facts(files: tuple[Path, ...], adapters: list, as_json: bool) -> None:
    from difflora.formats.describe import adapter_facts_json, describe_adapter

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
