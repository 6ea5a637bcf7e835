"""Human-readable facts about an adapter file: what `difflora inspect` prints.

Kept apart from the CLI so the same text is available from Python and in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from difflora.adapter.types import Adapter


def describe_adapter(adapter: Adapter, path: Path | str | None = None) -> str:
    meta = adapter.meta
    lines = []
    if path is not None:
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        lines.append(f"File:           {path} ({size / 1024:.1f} KiB)")
    lines += [
        f"Name:           {meta.name or '-'}",
        f"Format:         {_format_line(adapter)}",
        f"Base model:     {meta.base_model or 'unknown'}",
        f"Architecture:   {meta.base_architecture or meta.base_family or 'unknown'}",
        f"Base hash:      {meta.base_hash or 'unknown'}",
        f"Prediction:     {meta.prediction_type}",
        f"Trigger words:  {', '.join(meta.trigger_words) if meta.trigger_words else '-'}",
        f"Modules:        {len(adapter.modules)} adapted, {adapter.parameter_count:,} LoRA parameters",
    ]
    for component, facts in adapter.summary().items():
        lines.append(
            f"  {component:<14} {facts['modules']:>4} modules  rank {_counts(facts['rank'])}  "
            f"alpha {_counts(facts['alpha'])}  params {facts['parameters']:,}"
        )
        lines.append(f"  {'':<14} targets: {', '.join(facts['targets'])}")
        if "kinds" in facts:
            lines.append(f"  {'':<14} kinds: {_counts(facts['kinds'])} (LyCORIS: exact ΔW, composed fused)")
        if "dora" in facts:
            lines.append(f"  {'':<14} DoRA: a magnitude {_counts(facts['dora'])} (not additive)")
    if path is not None and Path(path).is_file() and Path(path).suffix.lower() == ".safetensors":
        from difflora.formats.consumers.verdicts import file_verdicts, format_verdicts
        from difflora.formats.family import family_of

        lines.append("Compatibility (each consumer's loading rules applied to every key):")
        verdicts = file_verdicts(path, family=family_of(meta.base_family).name)
        lines += ["  " + line for line in format_verdicts(verdicts)]
    if meta.created_at:
        lines.append(f"Created:        {meta.created_at} (difflora {meta.difflora_version or '?'})")
    if meta.config_toml.strip():
        lines.append("Configuration (TOML; `difflora train --config` on it reproduces the run):")
        lines += ["  " + line for line in meta.config_toml.strip().splitlines()]
    return "\n".join(lines)


def _format_line(adapter: Adapter) -> str:
    source = adapter.meta.source_format
    if source == "difflora":
        return "difflora native (diffusers PEFT layout)"
    return f"imported from {source}"


def _counts(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} (x{v})" for k, v in value.items())
    return str(value)


def adapter_facts_json(adapter: Adapter) -> str:
    """The same facts as JSON, for scripts (`difflora inspect --json`)."""
    meta = adapter.meta
    return json.dumps(
        {
            "name": meta.name,
            "source_format": meta.source_format,
            "base_model": meta.base_model,
            "base_architecture": meta.base_architecture,
            "base_hash": meta.base_hash,
            "prediction_type": meta.prediction_type,
            "trigger_words": meta.trigger_words,
            "modules": len(adapter.modules),
            "parameters": adapter.parameter_count,
            "components": adapter.summary(),
            "config": meta.config_toml,
        },
        indent=2,
    )
