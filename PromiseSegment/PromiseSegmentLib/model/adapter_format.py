"""The adapter file format without torch: the safetensors header, PromiseSegment's metadata and every
check that needs only the file (so the command line and Slicer refuse a damaged adapter before torch is
installed or a backbone is loaded)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Dict, Optional

from PromiseSegmentLib.errors import AdapterError, InputError
from PromiseSegmentLib.file_checks import check_input
from PromiseSegmentLib.names import BACKBONE_KINDS

METADATA_KEY = "promise_segment"
ADAPTER_KEYS = ("format_version", "backbone", "apm", "ips", "intensity", "target", "training")
FORMAT_VERSION = 2
MAX_HEADER = 100 << 20


def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a truncated or padded file
    is refused). Reads no tensor and needs no torch."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            if not 2 <= n <= min(size - 8, MAX_HEADER):
                raise ValueError(f"header size {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): {exc}") from None
    except RecursionError:
        raise AdapterError(f"{path} is damaged: its header nests too deeply to be an adapter's") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): its header is not a table")
    entries = [t for k, t in header.items() if k != "__metadata__"]
    if not isinstance(header.get("__metadata__", {}), dict) or not all(_is_tensor_entry(t) for t in entries):
        raise AdapterError(f"{path} is damaged: its header's metadata or tensor table is malformed")
    ends = [t["data_offsets"][1] for t in entries]
    if 8 + n + max(ends, default=0) != size:
        raise AdapterError(
            f"{path} is truncated or damaged: {size} bytes, its header describes {8 + n + max(ends, default=0)}"
        )
    return header


def _is_tensor_entry(t) -> bool:
    """A tensor entry as safetensors writes it: a dtype name, a shape and two whole-number byte offsets."""
    offsets = t.get("data_offsets") if isinstance(t, dict) else None
    return (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(v) is int and v >= 0 for v in offsets)
        and isinstance(t.get("dtype"), str)
        and isinstance(t.get("shape"), list)
    )


def read_adapter_metadata(path) -> Dict[str, Any]:
    """An adapter's metadata, fully checked; every problem is an ``AdapterError`` naming the file."""
    if not Path(path).is_file():
        try:
            check_input(path, "adapter")
        except InputError as exc:
            raise AdapterError(str(exc)) from None
    raw = (read_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise AdapterError(f"{path} is a safetensors file without PromiseSegment metadata; not an adapter")
    if not isinstance(raw, str):
        raise AdapterError(f"{path} is damaged: its {METADATA_KEY} metadata is not text")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise AdapterError(f"{path}: its metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterError(f"{path} is damaged: its metadata nests too deeply to be an adapter's") from None
    _check_format(meta, path)
    try:
        _check_adapter_parts(meta)
    except (InputError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: adapter metadata is invalid: {exc}") from None
    return meta


def _check_format(meta, path) -> None:
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{path}: its metadata has no integer format_version; not a PromiseSegment adapter")
    if version > FORMAT_VERSION:
        raise AdapterError(
            f"{path} has adapter format {version}; this PromiseSegment reads {FORMAT_VERSION}: update PromiseSegment"
        )
    if version < FORMAT_VERSION:
        raise AdapterError(
            f"{path} has adapter format {version} (from before backbones were recorded, SAM ViT "
            f"only); this PromiseSegment reads format {FORMAT_VERSION}: retrain the adapter"
        )
    missing = [k for k in ADAPTER_KEYS[:-1] if k not in meta]
    if missing:
        raise AdapterError(f"{path}: adapter metadata lacks {', '.join(missing)}")
    extra = sorted(set(meta) - set(ADAPTER_KEYS))
    if extra:
        raise AdapterError(
            f"{path}: adapter metadata has unknown keys ({', '.join(extra)}); it was edited or "
            f"written by another program"
        )


def _check_adapter_parts(meta: Dict[str, Any]) -> None:
    from PromiseSegmentLib.data.preprocessing import IntensityRule

    b = meta["backbone"]
    types = {"name": str, "family": str, "identity": str, "image_size": int, "tap_channels": list}
    if not isinstance(b, dict) or "name" not in b:
        raise ValueError("it lacks backbone.name")
    bad = [k for k, t in types.items() if k in b and not isinstance(b[k], t)]
    if bad:
        raise ValueError(f"backbone {', '.join(bad)} of the wrong type")
    for part in ("apm", "ips"):
        if meta[part] is not None and not isinstance(meta[part], dict):
            raise ValueError(f"{part} must be a table or null")
    if meta["apm"] is None and meta["ips"] is None:
        raise ValueError("it has neither an APM nor IPS")
    if not isinstance(meta["intensity"], dict):
        raise ValueError("intensity must be a table")
    IntensityRule.from_dict(meta["intensity"])
    target = meta["target"]
    color = target.get("color", [0, 0, 0]) if isinstance(target, dict) else None
    if (
        not isinstance(target, dict)
        or not isinstance(target.get("name", ""), str)
        or not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)
    ):
        raise ValueError("target must hold a name and an RGB colour of three numbers in 0..1")
    if not isinstance(meta.get("training", {}), dict):
        raise ValueError("training must be a table")


def check_adapter_fits(backbone: Optional[str], meta: Optional[Dict[str, Any]], path) -> None:
    """An adapter and a ``--backbone`` registry name that cannot work together are refused before any
    download or load (the same rule as ``registry._compatible``, from the torch-free catalogue)."""
    if not backbone or meta is None or backbone not in BACKBONE_KINDS:
        return
    trained = meta["backbone"].get("name")
    if trained in BACKBONE_KINDS and trained != backbone and BACKBONE_KINDS[trained] != BACKBONE_KINDS[backbone]:
        raise AdapterError(
            f"{path} was trained on backbone {trained}; --backbone {backbone} cannot use it "
            f"(leave out --backbone to use {trained})"
        )
