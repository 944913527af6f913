"""Slicing, square-pixel resampling, SAM resize and the exact inverse back to the slice grid."""

import numpy as np
import pytest
import torch

from PromiseSegmentLib.data.preprocessing import (
    InputError,
    IntensityRule,
    SliceGeometry,
    check_volume,
    put_slice,
    resolve_axis,
    slice_geometry,
    take_slice,
    to_uint8_rgb,
)
from PromiseSegmentLib.inference.engine import ImageEmbedding, InferenceEngine


def oblique_matrix(spacing=(0.7, 0.7, 3.0), degrees=25.0):
    a = np.deg2rad(degrees)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    m = np.eye(4)
    m[:3, :3] = rot @ np.diag(spacing)
    m[:3, 3] = (10, -20, 30)
    return m


def test_axis_names_follow_the_direction_matrix():
    m = np.eye(4)
    assert [resolve_axis(a, m) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    perm = np.eye(4)
    # I points to A, J to S, K to R (a coronal acquisition): axial slices are taken along J (array axis 1)
    perm[:3, :3] = np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]])
    assert resolve_axis("axial", perm) == 1 and resolve_axis("sagittal", perm) == 0
    with pytest.raises(InputError):
        resolve_axis("oblique", m)


def test_check_volume_shapes():
    assert check_volume(np.zeros((5, 6))).shape == (1, 5, 6)
    assert check_volume(np.zeros((40, 50, 3), np.uint8)).shape == (1, 40, 50, 3)
    assert check_volume(np.zeros((2, 40, 50, 4), np.uint8)).shape == (2, 40, 50, 3)
    with pytest.raises(InputError, match="4D"):
        check_volume(np.zeros((3, 4, 5, 6)))
    with pytest.raises(InputError):
        check_volume(np.zeros((2, 3, 4, 5, 6)))


def test_intensity_rules():
    vol = np.linspace(-1000, 1000, 1000).reshape(10, 10, 10)
    assert IntensityRule.ct(40, 400).value_range(vol) == (-160, 240)
    lo, hi = IntensityRule("percentile", low=1, high=99).value_range(vol)
    assert -1000 < lo < -960 and 960 < hi < 1000
    rgb = to_uint8_rgb(np.array([[-160.0, 40.0, 240.0, 900.0]]), (-160, 240))
    assert rgb.shape == (1, 4, 3) and list(rgb[0, :, 0]) == [0, 128, 255, 255]
    with pytest.raises(InputError):
        IntensityRule.ct(40, 0).value_range(vol)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_put_back_where_they_came_from(axis):
    vol = np.arange(5 * 6 * 7).reshape(5, 6, 7)
    out = np.zeros_like(vol)
    for s in range(vol.shape[axis]):
        put_slice(out, axis, s, take_slice(vol, axis, s))
    np.testing.assert_array_equal(out, vol)


def _round_trip(tiny_backbone, native_mask: np.ndarray, spacing):
    """native mask -> (square pixels, SAM resize, pad) as the image would go -> inverse to the native grid."""
    geom = SliceGeometry(native_mask.shape, spacing)
    engine = InferenceEngine(tiny_backbone, device="cpu")
    rgb = np.repeat((native_mask * 255).astype(np.uint8)[:, :, None], 3, 2)
    square = geom.image_to_square(rgb)
    resized = engine.spec.resize(square)
    size = engine.spec.image_size
    padded = np.zeros((size, size), np.float32)
    padded[: resized.shape[0], : resized.shape[1]] = resized[:, :, 0] / 255.0 - 0.5  # as "logits"
    emb = ImageEmbedding(None, resized.shape[:2], square.shape[:2])
    back = engine.postprocess(torch.from_numpy(padded)[None, None], emb, geom.native_shape)[0, 0].numpy() > 0
    return geom, back


@pytest.mark.parametrize(
    "shape,spacing", [((37, 53), (1.0, 1.0)), ((41, 29), (3.0, 0.7)), ((64, 33), (0.5, 1.3)), ((1, 97), (1.0, 1.0))]
)
@pytest.mark.parametrize("backbone", ["tiny_backbone", "lite_medsam"])
def test_mask_round_trip_lands_on_the_same_pixels(request, backbone, shape, spacing):
    tiny_backbone = request.getfixturevalue(backbone)
    mask = np.zeros(shape, bool)
    r0, r1 = max(0, shape[0] // 4), max(1, shape[0] * 3 // 4)
    mask[r0:r1, shape[1] // 5 : shape[1] * 3 // 5] = True
    geom, back = _round_trip(tiny_backbone, mask, spacing)
    if shape[0] > 1:
        assert geom.square_shape[0] * min(spacing) == pytest.approx(shape[0] * spacing[0], abs=min(spacing))
    inter = (back & mask).sum()
    assert 2 * inter / (back.sum() + mask.sum()) > 0.95
    assert np.abs(np.argwhere(back).mean(0) - np.argwhere(mask).mean(0)).max() < 0.6  # centroid within a pixel


def test_points_map_to_square_and_back():
    geom = SliceGeometry((40, 60), (3.0, 0.75))
    assert geom.square_shape == (160, 60)
    pts = np.array([[0.0, 0.0], [59.0, 39.0], [12.5, 7.25]])
    np.testing.assert_allclose(geom.points_to_native(geom.points_to_square(pts)), pts)
    # the centre of native row 0 is the centre of the first 4 square rows
    assert geom.points_to_square(np.array([[0.0, 0.0]]))[0, 1] == pytest.approx(1.5)


def test_slice_geometry_uses_in_plane_spacing():
    m = np.diag([0.7, 0.7, 3.0, 1.0])
    assert slice_geometry(m, 0, (100, 100)).is_identity
    assert slice_geometry(m, 1, (10, 100)).square_shape == (43, 100)
    assert slice_geometry(m, 2, (10, 100)).square_shape == (43, 100)


@pytest.mark.parametrize("spacing", [(3.0, 0.7), (0.5, 1.5), (1.0, 1.0)])
def test_mask_to_square_stays_aligned_with_its_image(spacing):
    """A mask and its image go to square pixels together: the mask equals the image's bright region."""
    native = np.zeros((30, 44), bool)
    native[8:20, 10:31] = True
    geom = SliceGeometry(native.shape, spacing)
    mask = geom.mask_to_square(native)
    image = geom.image_to_square(np.repeat(native.astype(np.uint8)[:, :, None] * 255, 3, 2))
    assert mask.shape == geom.square_shape and mask.dtype == bool and mask.any()
    assert np.array_equal(mask, image[:, :, 0] >= 128)
    scale = np.array(geom.square_shape) / np.array(native.shape)
    assert abs(mask.sum() - native.sum() * scale.prod()) <= 0.1 * native.sum() * scale.prod()
