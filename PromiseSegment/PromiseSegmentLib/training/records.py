"""What a training run reports: one record per epoch, its status while it runs, and its result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

from PromiseSegmentLib.model.adapter import Adapter


@dataclass
class EpochRecord:
    epoch: int
    phase: str  # "apm warm-up" or "joint"
    loss: float
    val_dice: float  # selection Dice in the configuration's mode (automatic with an APM; a warm-up epoch's
    # without IPS; NaN: not scored)
    val_box_dice: float  # with the ground-truth box through the adapter's IPS (NaN: not measured)
    val_box_iou: float  # the APM's box against the mask's
    seconds: float


@dataclass(frozen=True)
class TrainStatus:
    """Where a run is: ``done`` of ``total`` units (images while encoding, batches in an epoch phase) of
    ``phase``; ``record`` once an epoch has ended."""

    phase: str
    done: int
    total: int
    epoch: Optional[int] = None
    epochs: int = 0
    record: Optional[EpochRecord] = None


TrainProgress = Callable[[TrainStatus], None]


@dataclass
class TrainResult:
    adapter: Adapter
    history: List[EpochRecord]
    best_val_dice: float
    seconds: float
