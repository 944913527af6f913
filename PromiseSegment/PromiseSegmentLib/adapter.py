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

log = logging.getLogger(__name__)
FORMAT_VERSION = 1
METADATA_KEY = "promise_segment"


class AdapterError(ValueError):
    """An adapter file is unreadable or does not fit the chosen SAM."""


@dataclass
class Adapter:
    sam_variant: str
    sam_identity: str  # SHA-256 of the SAM checkpoint trained on (or the embedded backbone's seed tag)
    apm: Optional[APM] = None
    ips: Optional[IPS] = None
    intensity: IntensityRule = field(default_factory=IntensityRule)
    target_name: str = "Segment"
    target_color: tuple = (0.9, 0.3, 0.2)
    training: Dict[str, Any] = field(default_factory=dict)

    def metadata(self) -> Dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "sam_variant": self.sam_variant,
                "sam_checkpoint_sha256": self.sam_identity,
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


def save_adapter(adapter: Adapter, path) -> Path:
    """Write atomically (temporary file + rename) so an interrupted save never leaves a broken adapter."""
    path = Path(path)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous()
               for name, m in adapter.modules().items() for k, v in m.state_dict().items()}
    return write_atomically(path, lambda tmp: save_file(tensors, tmp,
                                                        metadata={METADATA_KEY: json.dumps(adapter.metadata())}))


def read_metadata(path) -> Dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): {exc}") from exc
    if raw is None:
        raise AdapterError(f"{path} is a safetensors file without PromiseSegment metadata; not an adapter")
    meta = json.loads(raw)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format {meta['format_version']}; this PromiseSegment reads "
                           f"up to {FORMAT_VERSION}: update PromiseSegment")
    return meta


def load_adapter(path, sam_variant: Optional[str] = None, sam_identity: Optional[str] = None,
                 allow_mismatch: bool = False) -> Adapter:
    """Load an adapter, refusing one trained on another SAM unless ``allow_mismatch`` (then it warns)."""
    meta = read_metadata(path)
    if sam_variant is not None and meta["sam_variant"] != sam_variant:
        raise AdapterError(f"{path} was trained on SAM {meta['sam_variant']} but the loaded SAM is {sam_variant}; "
                           f"load the matching SAM checkpoint (the layers differ, this cannot be overridden)")
    if sam_identity is not None and meta["sam_checkpoint_sha256"] != sam_identity:
        msg = (f"{path} was trained on SAM checkpoint {meta['sam_checkpoint_sha256']} but the loaded one is "
               f"{sam_identity}")
        if not allow_mismatch:
            raise AdapterError(msg + "; load that checkpoint, or allow the mismatch explicitly "
                                     "(--allow-backbone-mismatch) if you know the weights are compatible")
        log.warning("%s; continuing because the mismatch was allowed (results may be poor)", msg)
    apm = APM(**meta["apm"]) if meta.get("apm") else None
    ips = IPS(**meta["ips"]) if meta.get("ips") else None
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for name, module in (("apm", apm), ("ips", ips)):
        if module is None:
            continue
        state = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise AdapterError(f"{path}: {name.upper()} weights do not match its metadata: {exc}") from exc
    target = meta.get("target") or {}
    return Adapter(meta["sam_variant"], meta["sam_checkpoint_sha256"], apm, ips,
                   IntensityRule.from_dict(meta.get("intensity") or {}), target.get("name", "Segment"),
                   tuple(target.get("color", (0.9, 0.3, 0.2))), meta.get("training") or {}).eval()
