"""End-to-end runs on the real images in ../shared/data (skipped only when that folder is absent)."""

import numpy as np
import pytest

from PromiseSegmentLib.cli.main import main
from PromiseSegmentLib.data.datasets import load_volume_pairs
from PromiseSegmentLib.data.preprocessing import IntensityRule

pytestmark = pytest.mark.data


def test_evaluate_on_kvasir_writes_csv_and_figure(tmp_path, capsys, data_dir):
    out = tmp_path / "eval"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(data_dir / "kvasir-seg"),
                "--split",
                "val",
                "--limit",
                "4",
                "--mode",
                "vanilla",
                "--prompt",
                "gt-box",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0] == "id,dice,iou,hd95_px,note" and len(lines) == 5
    # LiteMedSAM, the default backbone, with its native prompt segments real polyps (0.918 over all 101)
    assert np.mean([float(row.split(",")[1]) for row in lines[1:]]) > 0.8
    assert (out / "figure.png").stat().st_size > 10_000
    assert "Dice" in capsys.readouterr().out


@pytest.mark.parametrize("axis", ["K", "J"])
def test_mr_volume_label_slices_are_square_pixel_cases(data_dir, axis):
    """brain1 is 0.78 x 0.78 x 6.5 mm: axial (K) slices are square already, coronal (J) slices are
    stretched 8x along the slice direction to square pixels, the expert mask with them."""
    from PromiseSegmentLib.data.preprocessing import in_plane_spacing, take_slice
    from PromiseSegmentLib.data.volume_io import read_labelmap, read_volume

    image, label = data_dir / "mr-volumes" / "brain1_image.nrrd", data_dir / "mr-volumes" / "brain1_label.nrrd"
    cases = load_volume_pairs([(image, label)], IntensityRule(), axis=axis, empty_share=0.2, dense=True)
    assert len(cases) >= 3
    assert sum(c.mask.any() for c in cases) < len(cases)  # some empty slices were included
    vol, truth = read_volume(image), read_labelmap(label).array > 0
    ax = "KJI".index(axis)
    native_shape = take_slice(truth, ax, 0).shape
    mm = np.array(native_shape) * np.array(in_plane_spacing(vol.ijk_to_ras, ax))  # rows, cols in mm
    for c in cases:
        assert c.rgb.dtype == np.uint8 and c.rgb.shape[:2] == c.mask.shape
        size = np.array(c.rgb.shape[:2])
        assert np.allclose(size / size.max(), mm / mm.max(), atol=2 / size.min()), "pixels are not square"
        index = int(c.id.rsplit("_", 1)[1])
        native = take_slice(truth, ax, index)
        assert abs(c.mask.mean() - native.mean()) <= 0.01 + 0.05 * native.mean(), "mask not resampled with it"
