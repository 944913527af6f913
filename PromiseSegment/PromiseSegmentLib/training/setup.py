"""What a training run starts from: the adapter to train for a configuration, the check that the cases can
teach anything, and the fingerprint that proves the backbone stayed frozen."""

from __future__ import annotations

import hashlib
from typing import List

import torch

from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.model.adapter import Adapter
from PromiseSegmentLib.model.adapter_format import BackboneRecord
from PromiseSegmentLib.model.apm import APM, default_slot_labels
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.training.config import TrainConfig


def backbone_fingerprint(sam) -> str:
    h = hashlib.sha256()
    for k, v in sorted(sam.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_adapter(cfg: TrainConfig, backbone: LoadedBackbone) -> Adapter:
    torch.manual_seed(cfg.seed)
    spec = backbone.spec
    apm = None
    if cfg.use_apm and cfg.user_prompt == "none":
        apm = APM(
            spec.tap_channels,
            spec.image_size,
            tuple(cfg.apm_prompts or spec.apm_prompts),
            default_slot_labels(cfg.n_points, cfg.n_positive),
            cfg.apm_fusion_dim,
            cfg.apm_head_blocks,
            cfg.apm_tap_pool,
        )
    ips = IPS() if cfg.use_ips else None
    if apm is None and ips is None:
        raise InputError("nothing to train: enable the APM and/or IPS")
    return Adapter(
        BackboneRecord.of(backbone),
        apm,
        ips,
        IntensityRule.from_dict(cfg.intensity),
        cfg.target_name,
        tuple(cfg.target_color),
    )


def track_apm(adapter: Adapter, cfg: TrainConfig, warmup: bool) -> None:
    """Let autograd track the APM only when a step changes it: in a joint phase that keeps the warmed-up APM
    (``apm_joint_lr`` 0) its forward and backward would be a quarter of the step's cost for nothing."""
    if adapter.apm is not None:
        adapter.apm.requires_grad_(warmup or cfg.apm_joint_lr > 0)


def check_training_cases(train: List[Case], val: List[Case]) -> None:
    """Refuse a training set nothing can be learnt from (before the backbone is loaded)."""
    if not train:
        raise InputError(
            f"no training cases ({len(val)} went to validation): give more images, or a smaller --val-fraction"
        )
    if not any(c.mask.any() for c in train):
        raise InputError(
            f"every training mask is empty ({len(train)} cases): there is nothing to learn (check "
            f"the label value or the mask files)"
        )
    if all(c.mask.all() for c in train):
        raise InputError(
            f"every training mask covers its whole image ({len(train)} cases): nothing tells the "
            f"target from its surroundings (check the label value or the mask files)"
        )
