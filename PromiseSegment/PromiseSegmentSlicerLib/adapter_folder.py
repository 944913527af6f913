"""The user's adapter folder: list, import (copy, never move) and describe adapter files.

Reading the description parses only the safetensors JSON header, so it works before torch is
installed and never executes anything from the file.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import List

from PromiseSegmentLib.paths import cache_dir, write_atomically

METADATA_KEY = "promise_segment"  # same key as PromiseSegmentLib.adapter writes
MAX_HEADER = 16 << 20


def adapter_dir() -> Path:
    return cache_dir() / "adapters"


def installed_adapters() -> List[Path]:
    folder = adapter_dir()
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def header_metadata(path) -> dict:
    """The adapter's metadata from the safetensors header; ``ValueError`` for anything else."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header size {size})")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ValueError(f"{path} is not a safetensors file (unreadable header)") from exc
    meta = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if meta is None:
        raise ValueError(f"{path} is a safetensors file without PromiseSegment metadata; not an adapter")
    return json.loads(meta)


def describe(path) -> str:
    try:
        m = header_metadata(path)
    except (OSError, ValueError) as exc:
        return f"not usable: {exc}"
    apm = m.get("apm") or {}
    parts = [p for p, present in ((f"APM ({'+'.join(apm.get('prompts', ['points']))})", apm),
                                  ("IPS", m.get("ips"))) if present]
    training = m.get("training") or {}
    dice = training.get("best_val_dice")
    backbone = (m.get("backbone") or {}).get("name") or f"SAM {m.get('sam_variant')} (old format: retrain)"
    return (f"{m.get('target', {}).get('name', '?')}: {'+'.join(parts) or 'empty'} for {backbone}"
            + (f", validation Dice {dice:.3f}" if isinstance(dice, (int, float)) else "")
            + f", intensity {m.get('intensity', {}).get('kind', '?')}")


def import_adapter(source) -> Path:
    """Check that ``source`` is an adapter, then copy it into the adapter folder (atomically; an
    existing adapter of the same name is never replaced - a numbered name is chosen instead)."""
    source = Path(source)
    header_metadata(source)
    folder = adapter_dir()
    folder.mkdir(parents=True, exist_ok=True)
    target, n = folder / source.name, 1
    while target.exists():
        target, n = folder / f"{source.stem}-{n}{source.suffix}", n + 1
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))
