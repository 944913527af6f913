"""Adapter files: APM/IPS weights as safetensors with JSON metadata in the header (no pickle, no code)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .apm import APM
from .ips import IPS
from .paths import write_atomically
from .preprocessing import IntensityRule
from .validation import FORMAT_VERSION, METADATA_KEY, AdapterError, read_adapter_metadata, read_safetensors_header

log = logging.getLogger(__name__)
__all__ = ["FORMAT_VERSION", "METADATA_KEY", "AdapterError", "Adapter", "BackboneRecord", "save_adapter",
           "read_metadata", "load_adapter"]  # FORMAT_VERSION 2: backbone-aware; APM with box head


@dataclass
class BackboneRecord:
    """What an adapter was trained on: registry name, family, weights identity (SHA-256), input size and
    preprocessing (adapters are refused on another backbone)."""

    name: str
    family: str
    identity: str
    image_size: int
    tap_channels: tuple

    @staticmethod
    def of(backbone) -> "BackboneRecord":
        spec = backbone.spec
        return BackboneRecord(spec.name, spec.family, backbone.identity, spec.image_size, tuple(spec.tap_channels))

    def to_dict(self) -> Dict[str, Any]:
        return {"name": self.name, "family": self.family, "identity": self.identity,
                "image_size": self.image_size, "tap_channels": list(self.tap_channels)}


@dataclass
class Adapter:
    backbone: BackboneRecord
    apm: Optional[APM] = None
    ips: Optional[IPS] = None
    intensity: IntensityRule = field(default_factory=IntensityRule)
    target_name: str = "Segment"
    target_color: tuple = (0.9, 0.3, 0.2)
    training: Dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> Dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "backbone": self.backbone.to_dict(),
                "apm": self.apm.config if self.apm is not None else None,
                "ips": self.ips.config if self.ips is not None else None,
                "intensity": self.intensity.to_dict(),
                "target": {"name": self.target_name, "color": list(self.target_color)},
                "training": self.training}

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


def save_adapter(adapter: Adapter, path, states: Optional[Dict[str, Dict[str, torch.Tensor]]] = None) -> Path:
    """Write atomically (temporary file + rename, header read back) so an interrupted or failed save never
    leaves a broken adapter. ``states`` (module name -> state dict) is written instead of the modules'
    current weights."""
    path = Path(path)
    states = states or {name: m.state_dict() for name, m in adapter.modules().items()}
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, s in states.items() for k, v in s.items()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp,
                                                        metadata={METADATA_KEY: json.dumps(adapter.metadata())}),
                            verify=read_safetensors_header)


def read_metadata(path) -> Dict[str, Any]:
    """The adapter's metadata, checked (format, keys, types, intensity rule) without loading a tensor;
    any problem is an ``AdapterError`` naming the file."""
    return read_adapter_metadata(path)


def load_adapter(path, backbone=None, allow_mismatch: bool = False) -> Adapter:
    """Load an adapter; with ``backbone`` (a ``LoadedBackbone``) refuse one trained on another backbone
    (always for another architecture; for other weights of the same architecture unless
    ``allow_mismatch``, then it warns)."""
    meta = read_metadata(path)
    rec = meta["backbone"]
    if backbone is not None:
        spec = backbone.spec
        if rec.get("family") != spec.family or list(rec.get("tap_channels", [])) != list(spec.tap_channels):
            raise AdapterError(f"{path} was trained on backbone {rec['name']} but the loaded backbone is "
                               f"{spec.name}; load {rec['name']} (the layers differ, this cannot be overridden)")
        if rec.get("identity") != backbone.identity:
            msg = (f"{path} was trained on {rec['name']} weights {rec.get('identity')} but the loaded ones are "
                   f"{backbone.identity}")
            if not allow_mismatch:
                raise AdapterError(msg + "; load those weights, or allow the mismatch explicitly "
                                         "(--allow-backbone-mismatch) if you know they are compatible")
            log.warning("%s; continuing because the mismatch was allowed (results may be poor)", msg)
    try:
        apm = APM(**meta["apm"]) if meta.get("apm") else None
        ips = IPS(**meta["ips"]) if meta.get("ips") else None
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: APM/IPS configuration in its metadata is invalid: {exc}") from exc
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error type: a damaged tensor table
        raise AdapterError(f"{path}: its weights cannot be read ({exc})") from None
    for name, module in (("apm", apm), ("ips", ips)):
        if module is None:
            continue
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterError(f"{path}: {name.upper()} weights do not match its metadata: {exc}") from exc
        if not all(torch.isfinite(v).all() for v in state.values()):
            raise AdapterError(f"{path}: {name.upper()} weights contain NaN or infinite values; the file is damaged")
    target = meta.get("target") or {}
    record = BackboneRecord(rec["name"], rec.get("family", ""), rec.get("identity", ""),
                            int(rec.get("image_size", 0)), tuple(rec.get("tap_channels", ())))
    return Adapter(record, apm, ips, IntensityRule.from_dict(meta.get("intensity") or {}),
                   target.get("name", "Segment"), tuple(target.get("color", (0.9, 0.3, 0.2))),
                   meta.get("training") or {}).eval()
