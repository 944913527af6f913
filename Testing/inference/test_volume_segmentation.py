"""Streaming slice-by-slice runs: axes, slice ranges, prompts per slice, progress and cancel."""

import numpy as np
import pytest
from sample_data import make_sample_volume

from PromiseSegmentLib.data.preprocessing import take_slice
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.errors import Cancelled, InputError
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.inference.volume_loop import PlainBackbone, segment_slice, segment_volume


@pytest.fixture(scope="module")
def sample():
    return make_sample_volume(5, shape=(10, 48, 40))


@pytest.mark.parametrize("axis", ["K", "J", "I"])
def test_only_prompted_slices_in_range_are_written(tiny_backbone, sample, axis):
    vol, truth = sample
    ax = "KJI".index(axis)
    engine = InferenceEngine(tiny_backbone, device="cpu", batch_size=2, cache=EmbeddingCache())  # 2nd run: decoder only
    present = [s for s in range(truth.shape[ax]) if take_slice(truth, ax, s).any()]
    prompts = {s: Prompts(box=mask_box(take_slice(truth, ax, s), 1)) for s in present}
    calls = []
    out = segment_volume(
        engine, vol.array, vol.ijk_to_ras, axis=axis, prompts=prompts, progress=lambda d, t: calls.append((d, t))
    )
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
    engine = InferenceEngine(tiny_backbone, device="cpu", batch_size=1)
    prompts = {k: Prompts(points=[[20, 20]]) for k in range(vol.array.shape[0])}
    seen = []
    with pytest.raises(Cancelled):
        segment_volume(
            engine,
            vol.array,
            vol.ijk_to_ras,
            prompts=prompts,
            progress=lambda d, t: seen.append(d),
            cancel=lambda: len(seen) >= 2,
        )
    assert len(seen) == 2


def test_bad_requests_are_explained(tiny_backbone, sample):
    vol, _ = sample
    engine = InferenceEngine(tiny_backbone, device="cpu")
    with pytest.raises(InputError, match="no slice to segment"):
        segment_volume(engine, vol.array, vol.ijk_to_ras)
    with pytest.raises(InputError, match="outside"):
        segment_volume(engine, vol.array, vol.ijk_to_ras, prompts={0: Prompts(points=[[1, 1]])}, slice_range=(5, 50))
    with pytest.raises(InputError, match="4D"):
        segment_volume(engine, np.zeros((2, 3, 4, 5)), vol.ijk_to_ras, prompts={0: Prompts(points=[[1, 1]])})


def test_box_runs_go_middle_out_with_the_previous_result_box(tiny_backbone, sample):
    """LiteMedSAM's reference 3D inference: the user's box on the middle slice only; each next slice is
    prompted with the previous slice's result box + 3 px (the middle box when that result is empty)."""
    from PromiseSegmentLib.inference.engine import Prediction
    from PromiseSegmentLib.inference.volume_loop import box_parents

    vol, _ = sample
    boxes = {k: Prompts(box=[10, 12, 30, 32]) for k in range(2, 9)}
    assert list(box_parents(list(range(2, 9)), boxes)) == [5, 6, 7, 8, 4, 3, 2]
    seen = {}

    class Shrinking(PlainBackbone):  # each result is its box shrunk by 4 px; empty on slice 7
        def predict(self, emb, prompts, size):
            x0, y0, x1, y1 = (int(v) for v in prompts.box)
            mask = np.zeros(size, bool)
            if len(seen) != 2:
                mask[y0 + 4 : y1 - 3, x0 + 4 : x1 - 3] = True
            seen[len(seen)] = list(prompts.box)
            return Prediction(mask[None], mask[None].astype(np.float32), np.ones(1), np.zeros((1, 256, 256)))

    model = Shrinking(InferenceEngine(tiny_backbone, device="cpu"))
    out = segment_volume(model, vol.array, vol.ijk_to_ras, prompts=boxes, box_propagation=True)
    order = [seen[i] for i in range(len(seen))]
    assert order[0] == [10, 12, 30, 32]  # slice 5: the user's box
    assert order[1] == [11, 13, 29, 31]  # slice 6: slice 5's result (14..26, 16..28) + 3 px
    assert order[3] == [10, 12, 30, 32]  # slice 8: slice 7 came out empty -> the middle box again
    assert order[4] == [11, 13, 29, 31]  # slice 4: from slice 5, going down
    assert out[5].any() and not out[7].any() and not out[:2].any()


def _box_adapter(backbone, presence: float):
    import torch

    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    adapter = build_adapter(TrainConfig(apm_prompts=("box",), apm_fusion_dim=16, apm_tap_pool=2), backbone)
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(presence)
        for p in adapter.ips.parameters():  # a non-zero shift
            p.add_(0.02 * torch.randn_like(p))
    adapter.apm.set_refinement(1, 0.1)
    return adapter.eval()


def test_automatic_batches_decode_as_one_and_equal_slice_by_slice(tiny_backbone, sample):
    """APM + IPS + decoder + box refinement + resampling for a batch of slices at once (the GPU path, run
    on the CPU) give the masks that one slice at a time gives."""
    from PromiseSegmentLib.model.promise import ProMISeModel

    vol, _ = sample
    adapter = _box_adapter(tiny_backbone, 5.0)
    one = ProMISeModel(InferenceEngine(tiny_backbone, "cpu", batch_size=1, capture_taps=True), adapter)
    four = ProMISeModel(InferenceEngine(tiny_backbone, "cpu", batch_size=4, capture_taps=True), adapter)
    a = one.segment_volume(vol.array, vol.ijk_to_ras, mode="apm+ips", slice_range=(0, 5))
    b = four.segment_volume(vol.array, vol.ijk_to_ras, mode="apm+ips", slice_range=(0, 5))
    assert a[:6].any(axis=(1, 2)).all()  # every slice has a mask to compare
    assert (a != b).mean() <= 1e-4  # batched float sums may flip a borderline voxel, no more
    slices = [
        np.repeat(((vol.array[k] - vol.array.min()) / np.ptp(vol.array) * 255).astype(np.uint8)[..., None], 3, 2)
        for k in range(3)
    ]
    embs = one.engine.encode(slices)
    per_image = np.stack([one.predict(e, mode="apm+ips").masks[0] for e in embs])
    assert (one.predict_masks(embs, embs[0].original_size) != per_image).mean() <= 1e-4
    absent = ProMISeModel(one.engine, _box_adapter(tiny_backbone, -5.0))  # the APM says: not on these slices
    assert not absent.predict_masks(embs, embs[0].original_size).any()
    with pytest.raises(ValueError, match="one size"):
        one.predict_masks([embs[0], one.engine.encode([slices[0][:40]])[0]], (10, 10))
