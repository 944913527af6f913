"""Streaming slice-by-slice runs: axes, slice ranges, prompts per slice, progress and cancel."""
import numpy as np
import pytest

from PromiseSegmentLib.engine import Cancelled, Prompts, SamEngine
from PromiseSegmentLib.preprocessing import InputError, mask_bbox, take_slice
from PromiseSegmentLib.sample_data import make_sample_volume
from PromiseSegmentLib.volume_segmentation import segment_volume


@pytest.fixture(scope="module")
def sample():
    return make_sample_volume(5, shape=(10, 48, 40))


@pytest.mark.parametrize("axis", ["K", "J", "I"])
def test_only_prompted_slices_in_range_are_written(tiny_backbone, sample, axis):
    vol, truth = sample
    ax = "KJI".index(axis)
    engine = SamEngine(tiny_backbone, device="cpu", batch_size=2)
    present = [s for s in range(truth.shape[ax]) if take_slice(truth, ax, s).any()]
    prompts = {s: Prompts(box=mask_bbox(take_slice(truth, ax, s), 1)) for s in present}
    calls = []
    out = segment_volume(engine, vol.array, vol.ijk_to_ras, axis=axis, prompts=prompts,
                         progress=lambda d, t: calls.append((d, t)))
    assert out.shape == truth.shape and out.dtype == np.uint8
    written = [s for s in range(out.shape[ax]) if take_slice(out, ax, s).any()]
    assert set(written) <= set(present)
    assert calls[-1] == (len(present), len(present))
    first, last = present[0], present[0] + 1
    ranged = segment_volume(engine, vol.array, vol.ijk_to_ras, axis=axis, prompts=prompts, slice_range=(first, last))
    assert all(not take_slice(ranged, ax, s).any() for s in range(out.shape[ax]) if not first <= s <= last)
    np.testing.assert_array_equal(take_slice(ranged, ax, first), take_slice(out, ax, first))


def test_cancel_raises_and_returns_nothing(tiny_backbone, sample):
    vol, truth = sample
    engine = SamEngine(tiny_backbone, device="cpu", batch_size=1)
    prompts = {k: Prompts(points=[[20, 20]]) for k in range(vol.array.shape[0])}
    seen = []
    with pytest.raises(Cancelled):
        segment_volume(engine, vol.array, vol.ijk_to_ras, prompts=prompts,
                       progress=lambda d, t: seen.append(d), cancel=lambda: len(seen) >= 2)
    assert len(seen) == 2


def test_bad_requests_are_explained(tiny_backbone, sample):
    vol, _ = sample
    engine = SamEngine(tiny_backbone, device="cpu")
    with pytest.raises(InputError, match="no slice to segment"):
        segment_volume(engine, vol.array, vol.ijk_to_ras)
    with pytest.raises(InputError, match="outside"):
        segment_volume(engine, vol.array, vol.ijk_to_ras, prompts={0: Prompts(points=[[1, 1]])}, slice_range=(5, 50))
    with pytest.raises(InputError, match="4D"):
        segment_volume(engine, np.zeros((2, 3, 4, 5)), vol.ijk_to_ras, prompts={0: Prompts(points=[[1, 1]])})
