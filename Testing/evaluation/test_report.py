"""The evaluation report's records: per-case scores, the summary over them and the CSV they become."""

import math

import numpy as np
import pytest

from PromiseSegmentLib.evaluation.report import CaseScore, metrics_csv, summary


def test_summary_and_csv_of_case_scores():
    empty = np.zeros((4, 4), bool)
    rows = [
        CaseScore("a", 1.0, 1.0, 2.0, empty),
        CaseScore("b", 0.5, 0.25, 6.0, empty),
        CaseScore("c", 0.0, 0.0, math.inf, empty, "empty ground truth"),
    ]
    s = summary(rows)
    assert (s.cases, s.empty_truth, s.hd95_undefined) == (3, 1, 1)
    assert s.dice_mean == pytest.approx(0.5) and s.dice_median == 0.5 and s.iou_mean == pytest.approx(1.25 / 3)
    assert s.hd95_median == 4.0  # the infinite one is counted as undefined, not averaged
    lines = metrics_csv(rows).decode().splitlines()
    assert lines[0] == "id,dice,iou,hd95_px,note"
    assert lines[2] == "b,0.5000,0.2500,6.00," and lines[3] == "c,0.0000,0.0000,inf,empty ground truth"
