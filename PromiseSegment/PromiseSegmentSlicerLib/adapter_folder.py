"""The user's adapter folder: list, import (copy, never move) and describe adapter files.

Reading the description parses only the safetensors JSON header (``validation.read_adapter_metadata``,
the same checks as the command line), so it works before torch is installed and never executes anything
from the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import List

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.model.adapter_format import read_adapter_metadata
from PromiseSegmentLib.paths import cache_dir


def adapter_dir() -> Path:
    return cache_dir() / "adapters"


def installed_adapters() -> List[Path]:
    folder = adapter_dir()
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def adapter_metadata(path) -> dict:
    """The adapter's checked metadata; ``AdapterError`` (a ``ValueError``) naming the file otherwise."""
    return read_adapter_metadata(path)


def describe(path) -> str:
    try:
        m = adapter_metadata(path)
    except (OSError, ValueError) as exc:
        return f"not usable: {exc}"
    apm = m.get("apm") or {}
    parts = [
        p
        for p, present in ((f"APM ({'+'.join(apm.get('prompts', ['points']))})", apm), ("IPS", m.get("ips")))
        if present
    ]
    training = m.get("training") or {}
    dice = training.get("best_val_dice")
    backbone = m["backbone"]["name"]
    return (
        f"{m.get('target', {}).get('name', '?')}: {'+'.join(parts) or 'empty'} for {backbone}"
        + (f", validation Dice {dice:.3f}" if isinstance(dice, (int, float)) else "")
        + f", intensity {m.get('intensity', {}).get('kind', '?')}"
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
