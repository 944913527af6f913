"""End-to-end runs on the real images in ../shared/data (skipped only when that folder is absent)."""
import numpy as np
import pytest

from conftest import DATA
from PromiseSegmentLib.cli import main
from PromiseSegmentLib.datasets import load_volume_pairs
from PromiseSegmentLib.preprocessing import IntensityRule

pytestmark = pytest.mark.data


def test_evaluate_on_kvasir_writes_csv_and_figure(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(DATA / "kvasir-seg"), "--split", "val", "--limit", "4",
                 "--mode", "vanilla", "--prompt", "gt-box", "--out", str(out)]) == 0
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "id,dice,iou,hd95_px" and len(lines) == 5
    # LiteMedSAM, the default backbone, with its native prompt segments real polyps (0.918 over all 101)
    assert np.mean([float(row.split(",")[1]) for row in lines[1:]]) > 0.8
    assert (out / "figure.png").stat().st_size > 10_000
    assert "Dice" in capsys.readouterr().out


def test_mr_volume_label_slices_are_square_pixel_cases():
    pairs = [(DATA / "mr-volumes" / "brain1_image.nrrd", DATA / "mr-volumes" / "brain1_label.nrrd")]
    cases = load_volume_pairs(pairs, IntensityRule(), axis="K", empty_share=0.2)
    assert len(cases) >= 3
    assert sum(c.mask.any() for c in cases) < len(cases)  # some empty slices were included
    for c in cases:
        assert c.rgb.dtype == np.uint8 and c.rgb.shape[:2] == c.mask.shape
