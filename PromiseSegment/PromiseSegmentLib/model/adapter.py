"""Adapter files: APM/IPS weights as safetensors with JSON metadata in the header (no pickle, no code)."""

from __future__ import annotations

import json
import logging
import reprlib
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import AdapterError
from PromiseSegmentLib.model.adapter_format import (
    FORMAT_VERSION,
    METADATA_KEY,
    AdapterMetadata,
    BackboneRecord,
    read_adapter_metadata,
    read_safetensors_header,
)
from PromiseSegmentLib.model.apm import APM
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.names import DEFAULT_COLOR, DEFAULT_NAME

log = logging.getLogger(__name__)
__all__ = [
    "FORMAT_VERSION",
    "METADATA_KEY",
    "AdapterError",
    "Adapter",
    "save_adapter",
    "read_metadata",
    "load_adapter",
]  # FORMAT_VERSION 2: backbone-aware; APM with box head


@dataclass
class Adapter:
    backbone: BackboneRecord
    apm: Optional[APM] = None
    ips: Optional[IPS] = None
    intensity: IntensityRule = field(default_factory=IntensityRule)
    target_name: str = DEFAULT_NAME
    target_color: tuple = DEFAULT_COLOR
    training: Dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> AdapterMetadata:
        return AdapterMetadata(
            self.backbone,
            self.apm.config if self.apm is not None else None,
            self.ips.config if self.ips is not None else None,
            self.intensity,
            self.target_name,
            self.target_color,
            self.training,
        )

    def modules(self) -> Dict[str, torch.nn.Module]:
        return {k: m for k, m in (("apm", self.apm), ("ips", self.ips)) if m is not None}

    def trainable_parameters(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters())

    def to(self, device) -> "Adapter":
        for m in self.modules().values():
            m.to(device)
        return self

    def eval(self) -> "Adapter":
        for m in self.modules().values():
            m.eval()
        return self


def _readable(tmp: str) -> None:
    read_safetensors_header(tmp)  # the written file reads back as an adapter's header


def save_adapter(adapter: Adapter, path, states: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Path:
    """Write atomically (temporary file + rename, header read back) so an interrupted or failed save never
    leaves a broken adapter. ``states`` (module name -> state dict) is written instead of the modules'
    current weights."""
    path = Path(path)
    states = states or {name: m.state_dict() for name, m in adapter.modules().items()}
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, s in states.items() for k, v in s.items()}
    return write_atomically(
        path,
        lambda tmp: save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(adapter.metadata().to_json())}),
        verify=_readable,
    )


def read_metadata(path) -> AdapterMetadata:
    """The adapter's metadata, checked against the file alone: format, keys and types (``validation``), the
    backbone record against the registry, the APM/IPS sizes, and every tensor's name, dtype, shape and bytes.
    The command line and Slicer call it before loading a backbone, so a damaged or edited file is refused
    before that; any problem is an ``AdapterError`` naming the file."""
    meta = read_adapter_metadata(path)
    _check_record(path, meta)
    expected = {
        f"{name}.{key}": (DTYPE_NAMES.get(t.dtype, str(t.dtype)), list(t.shape), t.numel() * t.element_size())
        for name, module in _build_modules(path, meta, "meta").items()
        for key, t in module.state_dict().items()
    }
    _check_tensors(path, _tensor_table(path), expected)
    return meta


DTYPE_NAMES = {torch.float32: "F32", torch.int64: "I64"}  # safetensors' names of what the modules hold


def _check_record(path, meta: AdapterMetadata) -> None:
    """The backbone record names a registered backbone and agrees with it, and the APM reads that backbone's
    taps at its input size: an edited record would otherwise pass the backbone check or mislead the APM."""
    from PromiseSegmentLib.backbones.registry import BACKBONES, user_backbones

    rec = meta.backbone
    spec = BACKBONES.get(rec.name)
    if spec is None:
        raise AdapterError(
            f"{path} was trained on backbone {reprlib.repr(rec.name)}, which this PromiseSegment "
            f"does not know ({', '.join(user_backbones())}): update PromiseSegment or use another "
            f"adapter"
        )
    want = {"family": spec.family, "image_size": spec.image_size, "tap_channels": list(spec.tap_channels)}
    found = {"family": rec.family, "image_size": rec.image_size, "tap_channels": list(rec.tap_channels)}
    if found != want:
        raise AdapterError(
            f"{path}: its backbone record {reprlib.repr(found)} contradicts the registry's "
            f"{spec.name} {want}; the file was edited or is damaged"
        )
    apm = meta.apm
    built_for = [_listed(apm.tap_channels), apm.image_size] if apm is not None else None
    if built_for is not None and built_for != [want["tap_channels"], want["image_size"]]:
        raise AdapterError(
            f"{path}: its APM was built for tap_channels {reprlib.repr(built_for[0])} and image_size "
            f"{reprlib.repr(built_for[1])}, but {spec.name} has {want['tap_channels']} and "
            f"{want['image_size']}; the file was edited or is damaged"
        )


def _listed(v):
    return list(v) if isinstance(v, tuple) else v


def _build_modules(path, meta: AdapterMetadata, device="cpu") -> Dict[str, torch.nn.Module]:
    """The APM/IPS the metadata describes; their sizes are checked before any layer is allocated, and on the
    "meta" device nothing is allocated at all (the shapes the file's tensors must have)."""
    try:
        with torch.device(device):
            apm = APM.from_config(meta.apm) if meta.apm is not None else None
            ips = IPS.from_config(meta.ips) if meta.ips is not None else None
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: APM/IPS configuration in its metadata is invalid: {exc}") from None
    return {k: m for k, m in (("apm", apm), ("ips", ips)) if m is not None}


def _tensor_table(path) -> Dict[str, Any]:
    """The header's tensor entries (read after ``read_safetensors_header`` checked its size); a name given
    twice is refused, since JSON readers keep only one of them."""
    tops: List[List[str]] = []

    def keep_names(pairs):
        tops.append([k for k, _ in pairs])  # the outermost object comes last
        return dict(pairs)

    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n), object_pairs_hook=keep_names)
    except (OSError, ValueError, struct.error) as exc:
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): {exc}") from None
    twice = sorted(k for k, count in Counter(tops[-1]).items() if count > 1)
    if twice:
        raise AdapterError(f"{path}: its header has duplicate tensor names ({_few(twice)}); the file is damaged")
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _check_tensors(path, table: Dict[str, Any], expected: Dict[str, Tuple[str, list, int]]) -> None:
    """Exactly the tensors the metadata implies, each with its dtype and shape, their bytes tiling the data
    (no gap, no overlap): checked from the header, so no weight is read and no backbone is needed."""
    missing, extra = sorted(set(expected) - set(table)), sorted(set(table) - set(expected))
    if missing:
        raise AdapterError(f"{path} lacks tensor(s) {_few(missing)} that its metadata needs; the file is damaged")
    if extra:
        raise AdapterError(
            f"{path} holds tensor(s) {_few(extra)} not in its metadata's APM/IPS; it was edited or "
            f"written by another program"
        )
    spans = []
    for name, (dtype, shape, nbytes) in sorted(expected.items()):
        entry = table[name] if isinstance(table[name], dict) else {}
        if (entry.get("dtype"), entry.get("shape")) != (dtype, shape):
            raise AdapterError(
                f"{path}: tensor {name} has dtype {reprlib.repr(entry.get('dtype'))} and shape "
                f"{reprlib.repr(entry.get('shape'))} where its metadata needs {dtype!r} and shape "
                f"{shape}; the file is damaged or was written by another program"
            )
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int for v in offsets)):
            raise AdapterError(f"{path}: tensor {name} has no valid data_offsets; the file is damaged")
        spans.append((offsets, nbytes, name))
    position = 0
    for (start, end), nbytes, name in sorted(spans):
        if start != position or end - start != nbytes:
            raise AdapterError(
                f"{path}: tensor {name}'s bytes {start}..{end} overlap another's, leave a gap or do "
                f"not fit its shape; the file is damaged"
            )
        position = end


def _few(names: List[str]) -> str:
    """At most five names, each cut to 60 characters: a hostile header must not make a huge message."""
    return ", ".join(n[:60] for n in names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_adapter(path, backbone=None, allow_mismatch: bool = False) -> Adapter:
    """Load an adapter (every check of ``read_metadata`` first, then the weights, NaN/infinite refused); with
    ``backbone`` (a ``LoadedBackbone``) refuse one trained on another backbone (always for another
    architecture; for other weights of the same architecture unless ``allow_mismatch``, then it warns)."""
    meta = read_metadata(path)
    if backbone is not None:
        _check_backbone(path, meta.backbone, backbone, allow_mismatch)
    modules = _build_modules(path, meta)
    _load_weights(path, modules)
    apm, ips = modules.get("apm"), modules.get("ips")
    assert apm is None or isinstance(apm, APM)
    assert ips is None or isinstance(ips, IPS)
    return Adapter(
        meta.backbone, apm, ips, meta.intensity, meta.target_name, meta.target_color, dict(meta.training)
    ).eval()


def _check_backbone(path, rec: BackboneRecord, backbone, allow_mismatch: bool) -> None:
    spec = backbone.spec
    if rec.family != spec.family or list(rec.tap_channels) != list(spec.tap_channels):
        raise AdapterError(
            f"{path} was trained on backbone {rec.name} but the loaded backbone is "
            f"{spec.name}; load {rec.name} (the layers differ, this cannot be overridden)"
        )
    if rec.identity != backbone.identity:
        msg = f"{path} was trained on {rec.name} weights {rec.identity} but the loaded ones are {backbone.identity}"
        if not allow_mismatch:
            raise AdapterError(
                msg + "; load those weights, or allow the mismatch explicitly "
                "(--allow-backbone-mismatch) if you know they are compatible"
            )
        log.warning("%s; continuing because the mismatch was allowed (results may be poor)", msg)


def _load_weights(path, modules: Dict[str, torch.nn.Module]) -> None:
    """The file's weights into ``modules``; NaN or infinite values are refused (they give empty masks)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error type: a damaged tensor table
        raise AdapterError(f"{path}: its weights cannot be read ({exc})") from None
    for name, module in modules.items():
        state = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterError(f"{path}: {name.upper()} weights do not match its metadata: {exc}") from exc
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise AdapterError(f"{path}: {name.upper()} weights contain NaN or infinite values; the file is damaged")
