"""The user's adapter folder: list, import (copy, never move) and describe adapter files.

Reading the description parses only the safetensors JSON header (``adapter_format.read_adapter_metadata``,
the same checks as the command line), so it works before torch is installed and never executes anything
from the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.model.adapter_format import AdapterMetadata, read_adapter_metadata
from PromiseSegmentLib.paths import cache_dir


def adapter_dir() -> Path:
    return cache_dir() / "adapters"


def installed_adapters() -> List[Path]:
    folder = adapter_dir()
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def adapter_metadata(path) -> AdapterMetadata:
    """The adapter's checked metadata; ``AdapterError`` (a ``ValueError``) naming the file otherwise."""
    return read_adapter_metadata(path)


def describe(path) -> str:
    try:
        m = adapter_metadata(path)
    except (OSError, ValueError) as exc:
        return f"not usable: {exc}"
    parts = [f"APM ({'+'.join(m.apm.prompts)})"] if m.apm else []
    parts += ["IPS"] if m.ips else []
    dice = m.best_val_dice
    return (
        f"{m.target_name}: {'+'.join(parts)} for {m.backbone.name}"
        + (f", validation Dice {dice:.3f}" if dice is not None else "")
        + f", intensity {m.intensity.kind}"
    )


def import_adapter(source) -> Path:
    """Check that ``source`` is an adapter, then copy it into the adapter folder (atomically; an
    existing adapter of the same name is never replaced - a numbered name is chosen instead)."""
    source = Path(source)
    adapter_metadata(source)
    folder = adapter_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / source.name, 1
    while target.exists():
        target, n = folder / f"{source.stem}-{n}{source.suffix}", n + 1
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
