"""Training options without torch: the configuration, its option names on the command line, and the checks
that refuse settings which cannot train (before any model work)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional, Sequence

from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.names import DEFAULT_COLOR, DEFAULT_NAME, RESNET34_BLOCKS

USER_PROMPTS = ("none", "box", "points")
OPTION_NAMES = {
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "n_points": "--points",
    "n_positive": "--positive",
    "apm_fusion_dim": "--apm-width",
    "apm_tap_pool": "--apm-tap-pool",
    "apm_head_blocks": "--apm-blocks",
    "box_loss_weight": "--box-loss-weight",
    "apm_warmup_epochs": "--apm-warmup",
    "user_prompt": "--user-prompt",
    "apm_prompts": "--apm-prompts",
    "apm_joint_lr": "--apm-joint-lr",
    "lr_schedule": "--lr-schedule",
    "augmented_copies": "--augmented-copies",
    "user_box_share": "--user-box-share",
}
LR_SCHEDULES = ("constant", "cosine")
WARMUP_SCORED_SHARE = 0.5
MAX_AUGMENTED_COPIES = 16  # each copy is one more encoded image kept in memory (fp16)


def check_train_settings(values: Dict[str, Any]) -> None:
    """The training options (``TrainConfig`` fields) that cannot train; one sentence, before any work."""
    for name in ("epochs", "batch_size", "n_points", "apm_fusion_dim", "apm_tap_pool"):
        if not isinstance(values[name], int) or values[name] < 1:
            raise InputError(f"{OPTION_NAMES[name]} must be at least 1, got {values[name]}")
    if not 0 <= values["n_positive"] <= values["n_points"]:
        raise InputError(f"--positive ({values['n_positive']}) must be between 0 and --points ({values['n_points']})")
    if not (isinstance(values["lr"], (int, float)) and math.isfinite(values["lr"]) and values["lr"] > 0):
        raise InputError(f"--lr must be a positive number, got {values['lr']}")
    if values["user_prompt"] not in USER_PROMPTS:
        raise InputError(f"--user-prompt must be one of {', '.join(USER_PROMPTS)}, got {values['user_prompt']!r}")
    if not 0 <= values["apm_warmup_epochs"] < values["epochs"]:
        raise InputError(
            f"--apm-warmup ({values['apm_warmup_epochs']}) must be shorter than --epochs ({values['epochs']})"
        )
    share = values.get("user_box_share", 0.0)
    if not (isinstance(share, (int, float)) and 0 <= share <= 1):
        raise InputError(f"--user-box-share must be between 0 and 1, got {share}")
    for name in ("box_loss_weight", "apm_joint_lr"):
        w = values.get(name, 0.0)
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise InputError(f"{OPTION_NAMES[name]} must be a non-negative number, got {w}")
    blocks = values["apm_head_blocks"]
    if len(blocks) != 4 or min(blocks) < 1:
        raise InputError(f"--apm-blocks must be four numbers of at least 1, got {list(blocks)}")
    if values.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {values['lr_schedule']!r}")
    copies = values.get("augmented_copies", 0)
    if not isinstance(copies, int) or not 0 <= copies <= MAX_AUGMENTED_COPIES:
        raise InputError(f"--augmented-copies must be 0..{MAX_AUGMENTED_COPIES}, got {copies}")
    if copies and not values.get("cache_features", True):
        raise InputError("--augmented-copies needs --cache-features (the copies are encoded once and kept)")
    prompts = values.get("apm_prompts")
    if prompts is not None and (not prompts or not set(prompts) <= {"box", "points"}):
        raise InputError(f"--apm-prompts must be box, points or box,points, got {prompts}")


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 8
    lr: float = 1e-5
    seed: int = 0
    augment: bool = True
    cache_features: bool = False  # encode once (fp16); only without augmentation
    augmented_copies: int = 0  # with cache_features: K augmented versions of each image, each encoded once
    use_apm: bool = True
    use_ips: bool = True
    apm_prompts: Optional[Sequence[str]] = None  # None: the backbone's (box for LiteMedSAM, points for SAM ViT)
    n_points: int = 16
    n_positive: int = 8
    apm_fusion_dim: int = 256
    apm_head_blocks: Sequence[int] = RESNET34_BLOCKS
    apm_tap_pool: int = 1  # average-pool the taps before the APM (2: a quarter of the cost)
    box_loss_weight: float = 1.0  # auxiliary APM loss (box, objectness, presence); 0 = the paper's mask loss only
    apm_warmup_epochs: int = 0  # epochs of APM alone on the auxiliary loss before the joint phase
    flip_warmup: bool = True  # random flips of the encoder taps (and boxes) during the APM warm-up
    apm_joint_lr: float = 1.0  # the APM's learning rate in the joint phase, as a share of lr (0: weights kept as
    # warmed up; its BatchNorm statistics still follow the data)
    lr_schedule: str = "constant"  # "cosine": within each phase (warm-up, joint), lr decays from lr towards 0
    user_box_share: float = 0.0  # joint phase: share of images prompted by a jittered ground-truth box instead of
    # the APM's, so IPS also serves a user's box (box mode with the same adapter); 0: the APM's boxes only
    user_prompt: str = "none"  # "box"/"points": no APM, IPS trained with prompts from the ground truth
    bf16: bool = True  # CUDA autocast; ignored on CPU
    target_name: str = DEFAULT_NAME
    target_color: Sequence[float] = DEFAULT_COLOR
    intensity: Dict = field(default_factory=lambda: IntensityRule().to_dict())

    def check(self) -> None:
        """Refuse settings that cannot train, before any model work (the rule the command line applies to
        its options)."""
        check_train_settings(asdict(self))
        IntensityRule.from_dict(self.intensity)

    @property
    def mode(self) -> str:
        """The ProMISe mode this configuration trains (``modes.resolve_mode``'s vocabulary)."""
        return "ips" if self.user_prompt != "none" or not self.use_apm else "apm+ips"


TRAIN_DEFAULTS: Dict[str, Any] = asdict(TrainConfig())  # what the command line shows as its defaults


def first_scored_warmup_epoch(cfg: TrainConfig) -> int:
    """The first warm-up epoch scored on the selection images: the last ``WARMUP_SCORED_SHARE`` of the warm-up
    (the trainer keeps the best one's APM; the first epochs are far from it)."""
    return int(cfg.apm_warmup_epochs * (1 - WARMUP_SCORED_SHARE))


def lr_factor(cfg: TrainConfig, epoch: int, warmup: bool) -> float:
    """The share of ``lr`` for ``epoch``: 1 (constant), or a cosine from 1 over the epoch's phase."""
    if cfg.lr_schedule == "constant":
        return 1.0
    start, length = (
        (0, cfg.apm_warmup_epochs) if warmup else (cfg.apm_warmup_epochs, cfg.epochs - cfg.apm_warmup_epochs)
    )
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - start) / max(1, length)))
