"""The segmentation metrics and their empty-mask conventions, against values worked out by hand."""

import math

import numpy as np
import pytest

from PromiseSegmentLib.evaluation.metrics import dice, hd95, iou


def square(size=20, lo=5, hi=10):
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_dice_and_iou_of_overlapping_squares():
    a, b = square(lo=0, hi=4), square(lo=2, hi=6)  # 16 pixels each, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / 32)
    assert iou(a, b) == pytest.approx(4 / 28)
    assert dice(a, a) == iou(a, a) == 1.0


@pytest.mark.parametrize("metric", [dice, iou])
def test_empty_masks_follow_one_convention(metric):
    empty, full = np.zeros((8, 8), bool), square(8, 2, 5)
    assert metric(empty, empty) == 1.0  # nothing to find, nothing found
    assert metric(empty, full) == 0.0 and metric(full, empty) == 0.0


def test_dice_accepts_label_values_as_foreground():
    labels = square().astype(np.uint8) * 7
    assert dice(labels, square()) == 1.0


def test_hd95_in_pixels_and_in_millimetres():
    a, b = square(lo=5, hi=10), square(lo=7, hi=12)  # the same square moved 2 pixels along both axes
    d = hd95(a, b)
    assert 2.0 <= d <= 2 * math.sqrt(2) + 1e-9
    assert hd95(a, b, spacing=(0.5, 0.5)) == pytest.approx(d * 0.5)
    assert hd95(a, a) == 0.0


def test_hd95_of_empty_masks_is_undefined_or_infinite():
    empty = np.zeros((8, 8), bool)
    assert math.isnan(hd95(empty, empty))
    assert hd95(empty, square(8, 2, 5)) == math.inf and hd95(square(8, 2, 5), empty) == math.inf


def test_hd95_ignores_the_farthest_five_percent():
    truth = np.zeros((200, 200), bool)
    truth[50:150, 50:150] = True
    pred = truth.copy()
    pred[10, 10] = True  # one far outlier pixel on a surface of about 400
    assert hd95(pred, truth) < 1.5
    assert hd95(pred, truth) < math.dist((10, 10), (50, 50))
