"""Streaming slice-by-slice runs: axes, slice ranges, prompts per slice, progress and cancel."""
import numpy as np
import pytest

from PromiseSegmentLib.embedding_cache import EmbeddingCache
from PromiseSegmentLib.engine import Cancelled, Prompts, SamEngine
from PromiseSegmentLib.preprocessing import InputError, mask_bbox, take_slice
from PromiseSegmentLib.sample_data import make_sample_volume
from PromiseSegmentLib.volume_segmentation import PlainBackbone, segment_slice, segment_volume


@pytest.fixture(scope="module")
def sample():
    return make_sample_volume(5, shape=(10, 48, 40))


@pytest.mark.parametrize("axis", ["K", "J", "I"])
def test_only_prompted_slices_in_range_are_written(tiny_backbone, sample, axis):
    vol, truth = sample
    ax = "KJI".index(axis)
    engine = SamEngine(tiny_backbone, device="cpu", batch_size=2, cache=EmbeddingCache())  # 2nd run: decoder only
    present = [s for s in range(truth.shape[ax]) if take_slice(truth, ax, s).any()]
    prompts = {s: Prompts(box=mask_bbox(take_slice(truth, ax, s), 1)) for s in present}
    calls = []
    out = segment_volume(engine, vol.array, vol.ijk_to_ras, axis=axis, prompts=prompts,
                         progress=lambda d, t: calls.append((d, t)))
    assert out.shape == truth.shape and out.dtype == np.uint8
    written = [s for s in range(out.shape[ax]) if take_slice(out, ax, s).any()]
    assert written and set(written) <= set(present)
    for s in present:  # each written slice is that slice's own result, on the right slice
        alone = segment_slice(engine, vol.array, vol.ijk_to_ras, ax, s, prompts[s])
        np.testing.assert_array_equal(take_slice(out, ax, s), alone.masks[0])
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


def test_box_runs_go_middle_out_with_the_previous_result_box(tiny_backbone, sample):
    """LiteMedSAM's reference 3D inference: the user's box on the middle slice only; each next slice is
    prompted with the previous slice's result box + 3 px (the middle box when that result is empty)."""
    from PromiseSegmentLib.engine import Prediction
    from PromiseSegmentLib.volume_segmentation import box_parents

    vol, _ = sample
    boxes = {k: Prompts(box=[10, 12, 30, 32]) for k in range(2, 9)}
    assert list(box_parents(list(range(2, 9)), boxes)) == [5, 6, 7, 8, 4, 3, 2]
    seen = {}

    class Shrinking(PlainBackbone):  # each result is its box shrunk by 4 px; empty on slice 7
        def predict(self, emb, prompts, size):
            x0, y0, x1, y1 = (int(v) for v in prompts.box)
            mask = np.zeros(size, bool)
            if len(seen) != 2:
                mask[y0 + 4:y1 - 3, x0 + 4:x1 - 3] = True
            seen[len(seen)] = list(prompts.box)
            return Prediction(mask[None], mask[None].astype(np.float32), np.ones(1), np.zeros((1, 256, 256)))

    model = Shrinking(SamEngine(tiny_backbone, device="cpu"))
    out = segment_volume(model, vol.array, vol.ijk_to_ras, prompts=boxes, box_propagation=True)
    order = [seen[i] for i in range(len(seen))]
    assert order[0] == [10, 12, 30, 32]  # slice 5: the user's box
    assert order[1] == [11, 13, 29, 31]  # slice 6: slice 5's result (14..26, 16..28) + 3 px
    assert order[3] == [10, 12, 30, 32]  # slice 8: slice 7 came out empty -> the middle box again
    assert order[4] == [11, 13, 29, 31]  # slice 4: from slice 5, going down
    assert out[5].any() and not out[7].any() and not out[:2].any()
