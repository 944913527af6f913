"""Selecting what a run keeps, on the held-out selection images: each epoch's Dice (automatic, and with the
ground-truth box through the adapter's IPS against the frozen backbone with the same box), and after
training the APM's box refinement. All in the decoder's 256x256 frame: fast, for comparison, not the
reported full-resolution metrics."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch

from PromiseSegmentLib.inference.engine import PromptBatch
from PromiseSegmentLib.model.adapter import Adapter
from PromiseSegmentLib.model.forward import promise_forward, refine_boxes
from PromiseSegmentLib.training.batches import collate, user_prompts
from PromiseSegmentLib.training.losses import batch_dice, box_iou

log = logging.getLogger(__name__)

# Box refinements tried after training (steps, margin as a share of the box side); see ``choose_refinement``.
REFINEMENTS = ((0, 0.0), (1, 0.0), (1, 0.05), (1, 0.1), (1, 0.2), (2, 0.1))
REFINEMENT_GAIN = 0.002


@dataclass
class SelectionScores:
    dice: float  # the configuration's own mode (automatic for an APM)
    box_dice: float  # ground-truth box with the adapter's IPS (NaN when not measured)
    box_iou: float  # the APM's box against the mask's (NaN without a box APM)


def _batches(trainer):
    source, n, size = trainer.features, len(trainer.val), trainer.cfg.batch_size
    for b in range(0, n, size):
        items = source.get_selection(range(b, min(n, b + size)))
        yield items, collate(items, trainer.engine.device)


@torch.no_grad()
def score_epoch(trainer, adapter: Optional[Adapter] = None) -> SelectionScores:
    """Mean Dice on the selection images in the configuration's mode; with an APM also the adapter with
    the ground-truth box (box mode) and the APM box's IoU. ``adapter`` (default: the trainer's) lets a
    warm-up epoch be scored without IPS: its APM's prompts through the frozen decoder."""
    adapter = trainer.adapter if adapter is None else adapter
    for m in adapter.modules().values():
        m.eval()
    backbone, cfg = trainer.engine.backbone, trainer.cfg
    rng = np.random.default_rng(0)  # the same simulated prompts every epoch
    scores: List[float] = []
    box_scores: List[float] = []
    ious: List[float] = []
    for items, batch in _batches(trainer):
        user = user_prompts(items, batch, cfg.user_prompt, rng, trainer.engine.spec)
        out = promise_forward(backbone, adapter, batch.features, batch.taps, user, cfg.mode, taps_prepared=True)
        scores += batch_dice(out.low_res[:, 0].float(), batch.target)
        if out.apm is not None and out.apm.box is not None and bool(batch.present.any()):
            ious += box_iou(out.apm.box[batch.present], batch.boxes[batch.present]).iou.tolist()
        if cfg.mode == "apm+ips" and adapter.ips is not None:
            box_scores += _box_dice(trainer, items, batch, adapter)
    return SelectionScores(float(np.mean(scores)), _mean(box_scores), _mean(ious))


@torch.no_grad()
def frozen_box_dice(trainer) -> float:
    """The frozen backbone's Dice with the ground-truth box on the selection images: the bar the adapter's
    box mode must not fall below."""
    return _mean([d for items, batch in _batches(trainer) for d in _box_dice(trainer, items, batch, None)])


def _box_dice(trainer, items, batch, adapter) -> List[float]:
    boxes = user_prompts(items, batch, "box", np.random.default_rng(0), trainer.engine.spec)
    mode = "ips" if adapter is not None else "vanilla"
    out = promise_forward(trainer.engine.backbone, adapter, batch.features, None, boxes, mode)
    return batch_dice(out.low_res[:, 0].float(), batch.target)


def _mean(values: List[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def choose_refinement(trainer) -> List[Dict[str, float]]:
    """Set the APM's box refinement (``forward.refine_boxes``) to the candidate with the best selection Dice;
    a refinement must beat none by ``REFINEMENT_GAIN`` to be chosen (it costs a decode per step). Returns
    every candidate with its Dice."""
    apm = trainer.adapter.apm
    assert apm is not None, "box refinement is chosen only for an APM"
    for m in trainer.adapter.modules().values():
        m.eval()
    scores: Dict[tuple, List[float]] = {c: [] for c in REFINEMENTS}
    backbone, threshold = trainer.engine.backbone, trainer.engine.mask_threshold
    for items, batch in _batches(trainer):
        out = promise_forward(
            backbone, trainer.adapter, batch.features, batch.taps, PromptBatch(), "apm+ips", taps_prepared=True
        )
        sizes = [it.input_size for it in items]
        for steps, margin in REFINEMENTS:
            refined = refine_boxes(backbone, trainer.adapter, batch.features, out, sizes, threshold, steps, margin)
            scores[(steps, margin)] += batch_dice(refined.low_res[:, 0].float(), batch.target)
    means = {c: float(np.mean(v)) for c, v in scores.items()}
    best = max(REFINEMENTS, key=lambda c: means[c] - (REFINEMENT_GAIN if c[0] else 0.0))
    apm.set_refinement(*best)
    log.info("box refinement %s (selection Dice %s)", best, means)
    return [{"steps": steps, "margin": margin, "val_dice": d} for (steps, margin), d in means.items()]
