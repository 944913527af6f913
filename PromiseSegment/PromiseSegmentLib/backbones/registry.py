"""The backbone registry (as ``segment_anything.sam_model_registry``): every backbone by name, and
loading one by name or from a checkpoint file. Adding a backbone is one module plus one entry here;
``backbone`` holds the base class and knows no backbone, so the two form no import cycle."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch

from PromiseSegmentLib.backbones.base import Backbone, LoadedBackbone
from PromiseSegmentLib.backbones.lite_medsam import LiteMedSAM
from PromiseSegmentLib.backbones.sam_vit import SAM_VIT_BACKBONES
from PromiseSegmentLib.callbacks import ProgressFn
from PromiseSegmentLib.errors import CheckpointError
from PromiseSegmentLib.names import DEFAULT_BACKBONE


def _registry() -> Dict[str, Backbone]:
    entries: List[Backbone] = [LiteMedSAM(), *SAM_VIT_BACKBONES]
    return {b.name: b for b in entries}


BACKBONES: Dict[str, Backbone] = _registry()


def user_backbones() -> List[str]:
    """Names offered to users (CLI choices, Slicer lists), the default first."""
    return [n for n, b in BACKBONES.items() if b.user_visible]


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise CheckpointError(f"unknown backbone {name!r}; one of {', '.join(user_backbones())}, or a checkpoint file")
    return BACKBONES[name]


def identify(state: Mapping[str, torch.Tensor]) -> Backbone:
    """The registered backbone whose architecture a state dict fits (first match; MedSAM fits sam_vit_b)."""
    for b in BACKBONES.values():
        if b.recognises(state):
            return b
    raise CheckpointError("the weights match no known backbone (LiteMedSAM, SAM ViT-B/L/H, MedSAM)")


def load_backbone(
    name_or_path: Optional[str] = None,
    expected: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel=None,
    optimise: bool = True,
) -> LoadedBackbone:
    """A backbone by registry name (``None`` = the default, LiteMedSAM) or by checkpoint path.

    ``expected`` (a registry name, e.g. from an adapter's metadata) is checked against what is loaded.
    ``optimise=False`` keeps the model exactly as built (no load-time rewrites; for comparisons).
    """
    from PromiseSegmentLib.backbones.checkpoints import load_state_dict

    name_or_path = name_or_path or DEFAULT_BACKBONE
    if name_or_path in BACKBONES:
        loaded = BACKBONES[name_or_path].load(progress=progress, cancel=cancel, optimise=optimise)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CheckpointError(
                f"backbone {name_or_path!r} is neither a file nor one of: {', '.join(user_backbones())}"
            )
        if expected in BACKBONES and BACKBONES[expected].recognises(load_state_dict(path)):
            loaded = BACKBONES[expected].load(path, optimise=optimise)
        else:
            loaded = identify(load_state_dict(path)).load(path, optimise=optimise)
    if expected and not _compatible(loaded.spec, expected):
        raise CheckpointError(
            f"the adapter needs backbone {expected} but {name_or_path} is {loaded.name}; choose --backbone {expected}"
        )
    return loaded


def expected_identity(request: Optional[str], trained_on) -> str:
    """The identity (weights SHA-256) ``load_backbone(request, trained_on.name)`` will give, without loading
    the weights where a registered checksum or the file tells it. ``trained_on``: an adapter's
    ``BackboneRecord``; ``request`` None means that backbone."""
    from PromiseSegmentLib.backbones.checkpoints import file_sha256

    if request is None or request == trained_on.name:
        return trained_on.identity
    if request in BACKBONES:
        backbone = BACKBONES[request]
        if backbone.checkpoint is None:  # a test fixture built from a seed: no file
            return backbone.load(optimise=False).identity
        return backbone.checkpoint.sha256 or file_sha256(backbone.locate())
    return file_sha256(Path(request).expanduser())


def _compatible(backbone: Backbone, expected: str) -> bool:
    other = BACKBONES.get(expected)
    return backbone.name == expected or (
        other is not None and other.family == backbone.family and other.tap_channels == backbone.tap_channels
    )
