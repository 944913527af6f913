"""The adapter file format without torch: the safetensors header, PromiseSegment's metadata and every
check that needs only the file (so the command line and Slicer refuse a damaged adapter before torch is
installed or a backbone is loaded)."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import AdapterError, InputError
from PromiseSegmentLib.file_checks import check_input
from PromiseSegmentLib.model.module_configs import ApmConfig, IpsConfig, config_from_json, config_to_json
from PromiseSegmentLib.names import BACKBONE_KINDS, DEFAULT_COLOR, DEFAULT_NAME

METADATA_KEY = "promise_segment"
ADAPTER_KEYS = ("format_version", "backbone", "apm", "ips", "intensity", "target", "training")
FORMAT_VERSION = 2
MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class BackboneRecord:
    """What an adapter was trained on: registry name, family, weights identity (SHA-256), input size and
    taps (adapters are refused on another backbone)."""

    name: str
    family: str
    identity: str
    image_size: int
    tap_channels: Tuple[int, ...]

    @staticmethod
    def of(backbone) -> "BackboneRecord":
        """The record of a ``LoadedBackbone``."""
        spec = backbone.spec
        return BackboneRecord(spec.name, spec.family, backbone.identity, spec.image_size, tuple(spec.tap_channels))

    def to_json(self) -> Dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "identity": self.identity,
            "image_size": self.image_size,
            "tap_channels": list(self.tap_channels),
        }


@dataclass(frozen=True)
class AdapterMetadata:
    """An adapter file's metadata, parsed and checked once (``read_adapter_metadata``): what the loader,
    the command line's checks, the adapter folder and the Slicer effect read."""

    backbone: BackboneRecord
    apm: Optional[ApmConfig]
    ips: Optional[IpsConfig]
    intensity: IntensityRule = field(default_factory=IntensityRule)
    target_name: str = DEFAULT_NAME
    target_color: Tuple[float, float, float] = DEFAULT_COLOR
    training: Mapping[str, Any] = field(default_factory=dict)  # the run's record: options, scores, history

    @property
    def best_val_dice(self) -> Optional[float]:
        dice = self.training.get("best_val_dice")
        return float(dice) if isinstance(dice, (int, float)) and not isinstance(dice, bool) else None

    def to_json(self) -> Dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "backbone": self.backbone.to_json(),
            "apm": config_to_json(self.apm) if self.apm is not None else None,
            "ips": config_to_json(self.ips) if self.ips is not None else None,
            "intensity": self.intensity.to_dict(),
            "target": {"name": self.target_name, "color": list(self.target_color)},
            "training": dict(self.training),
        }


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


def read_adapter_metadata(path) -> AdapterMetadata:
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
        return _parse(meta)
    except (InputError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: adapter metadata is invalid: {exc}") from None


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


def _parse(meta: Dict[str, Any]) -> AdapterMetadata:
    b = meta["backbone"]
    types = {"name": str, "family": str, "identity": str, "image_size": int, "tap_channels": list}
    if not isinstance(b, dict) or "name" not in b:
        raise ValueError("it lacks backbone.name")
    bad = [k for k, t in types.items() if k in b and not isinstance(b[k], t)]
    if bad:
        raise ValueError(f"backbone {', '.join(bad)} of the wrong type")
    if meta["apm"] is None and meta["ips"] is None:
        raise ValueError("it has neither an APM nor IPS")
    if not isinstance(meta["intensity"], dict):
        raise ValueError("intensity must be a table")
    target = meta["target"]
    color = target.get("color", list(DEFAULT_COLOR)) if isinstance(target, dict) else None
    if (
        not isinstance(target, dict)
        or not isinstance(target.get("name", ""), str)
        or not isinstance(color, list)
        or len(color) != 3
        or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)
    ):
        raise ValueError("target must hold a name and an RGB colour of three numbers in 0..1")
    training = meta.get("training", {})
    if not isinstance(training, dict):
        raise ValueError("training must be a table")
    return AdapterMetadata(
        BackboneRecord(
            b["name"],
            b.get("family", ""),
            b.get("identity", ""),
            b.get("image_size", 0),
            tuple(b.get("tap_channels", ())),
        ),
        config_from_json(ApmConfig, meta["apm"]) if meta["apm"] is not None else None,
        config_from_json(IpsConfig, meta["ips"]) if meta["ips"] is not None else None,
        IntensityRule.from_dict(meta["intensity"]),
        target.get("name", DEFAULT_NAME),
        (float(color[0]), float(color[1]), float(color[2])),
        training,
    )


def check_adapter_fits(backbone: Optional[str], meta: Optional[AdapterMetadata], path) -> None:
    """An adapter and a ``--backbone`` registry name that cannot work together are refused before any
    download or load (the same rule as ``registry._compatible``, from the torch-free catalogue)."""
    if not backbone or meta is None or backbone not in BACKBONE_KINDS:
        return
    trained = meta.backbone.name
    if trained in BACKBONE_KINDS and trained != backbone and BACKBONE_KINDS[trained] != BACKBONE_KINDS[backbone]:
        raise AdapterError(
            f"{path} was trained on backbone {trained}; --backbone {backbone} cannot use it "
            f"(leave out --backbone to use {trained})"
        )
