"""The training losses: mask loss, box overlap, the APM's auxiliary loss and the selection Dice."""

import pytest
import torch

from PromiseSegmentLib.model.apm import ApmOutput
from PromiseSegmentLib.training.batches import Batch
from PromiseSegmentLib.training.losses import apm_aux_loss, batch_dice, box_iou, seg_loss


def test_seg_loss_is_low_for_the_right_mask_and_high_for_the_wrong_one():
    target = torch.zeros(2, 16, 16)
    target[:, 4:12, 4:12] = 1
    right, wrong = (target * 2 - 1) * 10, (1 - target * 2) * 10
    assert float(seg_loss(right, target)) < 0.01 < 1.0 < float(seg_loss(wrong, target))


def test_box_iou_union_and_hull():
    a = torch.tensor([[0.0, 0, 4, 4], [0, 0, 2, 2]])
    b = torch.tensor([[2.0, 2, 6, 6], [4, 4, 6, 6]])
    o = box_iou(a, b)
    assert o.iou.tolist() == pytest.approx([4 / 28, 0.0])
    assert o.union.tolist() == pytest.approx([28.0, 8.0])
    assert o.hull.tolist() == pytest.approx([36.0, 36.0])


def test_box_iou_of_a_degenerate_box_is_zero_not_nan():
    o = box_iou(torch.tensor([[3.0, 3, 3, 3]]), torch.tensor([[0.0, 0, 4, 4]]))
    assert float(o.iou) == 0.0


def test_batch_dice_counts_two_empty_masks_as_agreeing():
    target = torch.zeros(2, 8, 8)
    target[0, 2:6, 2:6] = 1
    logits = torch.full((2, 8, 8), -5.0)
    logits[0, 2:6, 2:4] = 5.0  # half of the first mask; nothing on the empty second
    assert batch_dice(logits, target) == pytest.approx([2 * 8 / (8 + 16), 1.0])


def _batch(boxes, present, image_size=64):
    target = torch.zeros(len(boxes), 32, 32)
    for k, (x0, y0, x1, y1) in enumerate(boxes):
        if present[k]:
            target[k, int(y0) // 2 : int(y1) // 2, int(x0) // 2 : int(x1) // 2] = 1
    return Batch(
        torch.zeros(len(boxes), 1), [], target, torch.tensor(boxes, dtype=torch.float32), torch.tensor(present)
    )


def test_apm_aux_loss_prefers_the_true_box_and_skips_absent_targets():
    batch = _batch([[8.0, 8, 40, 40], [0, 0, 0, 0]], [True, False])
    objectness = torch.full((2, 1, 8, 8), -5.0)
    objectness[0, :, 2:10, 2:10] = 5.0
    presence = torch.tensor([5.0, -5.0])
    right = ApmOutput(box=batch.boxes.clone(), objectness=objectness, presence=presence)
    off = batch.boxes.clone()
    off[0] += 20
    wrong = ApmOutput(box=off, objectness=objectness, presence=presence)
    assert float(apm_aux_loss(right, batch, 64)) < float(apm_aux_loss(wrong, batch, 64))
    moved_absent = right.box.clone()
    moved_absent[1] = torch.tensor([10.0, 10, 50, 50])  # the absent image's box is not scored
    same = ApmOutput(box=moved_absent, objectness=objectness, presence=presence)
    assert float(apm_aux_loss(same, batch, 64)) == pytest.approx(float(apm_aux_loss(right, batch, 64)))
