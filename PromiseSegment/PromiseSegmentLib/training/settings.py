"""Training options without torch: their defaults, names on the command line, and the checks that refuse
settings which cannot train (before any model work)."""
from __future__ import annotations

import math
from typing import Any, Dict

from PromiseSegmentLib.errors import InputError

# TrainConfig's defaults, readable without importing torch (Testing/test_reliability.py keeps them equal).
TRAIN_DEFAULTS: Dict[str, Any] = dict(epochs=200, batch_size=8, lr=1e-5, seed=0, n_points=16, n_positive=8,
                                      apm_fusion_dim=256, apm_head_blocks=(3, 4, 6, 3), apm_tap_pool=1,
                                      box_loss_weight=1.0, apm_warmup_epochs=0, user_prompt="none",
                                      apm_joint_lr=1.0, lr_schedule="constant", augmented_copies=0)
USER_PROMPTS = ("none", "box", "points")
OPTION_NAMES = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "n_points": "--points",
           "n_positive": "--positive", "apm_fusion_dim": "--apm-width", "apm_tap_pool": "--apm-tap-pool",
           "apm_head_blocks": "--apm-blocks", "box_loss_weight": "--box-loss-weight",
           "apm_warmup_epochs": "--apm-warmup", "user_prompt": "--user-prompt", "apm_prompts": "--apm-prompts",
           "apm_joint_lr": "--apm-joint-lr", "lr_schedule": "--lr-schedule",
           "augmented_copies": "--augmented-copies"}
LR_SCHEDULES = ("constant", "cosine")
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
        raise InputError(f"--apm-warmup ({values['apm_warmup_epochs']}) must be shorter than --epochs "
                         f"({values['epochs']})")
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


