"""Training losses and the Dice used for model selection: the paper's mask loss (BCE + soft Dice on the
decode token), the APM's auxiliary box/objectness/presence loss, and box IoU."""

from __future__ import annotations

from typing import List, NamedTuple

import torch
import torch.nn.functional as F


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    dice = 1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return bce + dice.mean()


class BoxOverlap(NamedTuple):
    """Per box pair (each (B,)): IoU, the union's area, the smallest enclosing box's area."""

    iou: torch.Tensor
    union: torch.Tensor
    hull: torch.Tensor


def box_iou(a: torch.Tensor, b: torch.Tensor) -> BoxOverlap:
    """Overlap of (B, 4) boxes x0, y0, x1, y1."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda x: (x[:, 2:] - x[:, :2]).clamp(min=0).prod(1)  # noqa: E731
    union = area(a) + area(b) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return BoxOverlap(inter / union.clamp(min=1e-6), union, hull)


def apm_aux_loss(apm_out, batch, image_size: int) -> torch.Tensor:
    """Box (L1 + generalised IoU, in fractions of the side), objectness map and presence BCE; ``batch`` a
    ``training.Batch`` (features, target, boxes, present)."""
    loss = batch.target.new_zeros(())
    if apm_out.presence is not None:
        loss = loss + F.binary_cross_entropy_with_logits(apm_out.presence, batch.present.float())
    keep = batch.present
    if apm_out.box is None or not bool(keep.any()):
        return loss
    pred, gt = apm_out.box[keep] / image_size, batch.boxes[keep] / image_size
    iou, union, hull = box_iou(pred, gt)
    giou = iou - (hull - union) / hull.clamp(min=1e-6)
    loss = loss + F.l1_loss(pred, gt) * 4 + (1 - giou).mean()
    obj = apm_out.objectness[keep]
    target = F.adaptive_avg_pool2d(batch.target[keep][:, None], obj.shape[-2:]) > 0.5
    return loss + F.binary_cross_entropy_with_logits(obj, target.float())


def batch_dice(logits: torch.Tensor, target: torch.Tensor) -> List[float]:
    p, t = (logits > 0).flatten(1).float(), target.flatten(1)
    inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
    return [1.0 if float(s) == 0 else float(2 * i / s) for i, s in zip(inter, total)]
