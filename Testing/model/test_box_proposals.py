"""Box proposals: the APM's global box and the boxes of its objectness regions, decoded, the best one kept."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from PromiseSegmentLib.inference.engine import InferenceEngine, PromptBatch
from PromiseSegmentLib.model.box_proposals import MASS_WEIGHT, box_proposals, region_weights
from PromiseSegmentLib.model.forward import choose_proposal, promise_forward
from PromiseSegmentLib.model.promise import ProMISeModel


def _two_blobs(h=16, w=16, left=4.0, right=3.0):
    """Objectness logits with two peaks (left heavier), and cell boxes that say "the object is this cell's
    4x4 neighbourhood": the global (mean) box then lies between the blobs, each region's box on its own."""
    score = torch.full((1, 1, h, w), -10.0)
    score[0, 0, 6:9, 1:4] = left
    score[0, 0, 6:9, 12:15] = right
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    half = 2.0 / w
    cells = torch.stack([xs - half, ys - half, xs + half, ys + half])[None]
    return cells, score


def test_each_region_gets_its_own_box_the_heaviest_first_while_the_global_box_falls_between():
    cells, score = _two_blobs()
    boxes, mass = box_proposals(cells, score, 3)
    assert boxes.shape == (1, 4, 4) and mass.shape == (1, 4)
    global_box, left, right, padding = boxes[0]
    assert 4 / 16 < (global_box[0] + global_box[2]) / 2 < 12 / 16  # the mean box is on neither blob
    assert left[2] < 0.35 and right[0] > 0.65  # each region's box stays on its blob
    assert mass[0, 0] == pytest.approx(1.0) and mass[0, 1] > mass[0, 2] > 0.0
    assert mass[0, 1] + mass[0, 2] == pytest.approx(1.0, abs=1e-3)  # almost all the weight is in the blobs
    assert torch.equal(padding, global_box)  # only two regions: the third row repeats the global box


def test_a_map_with_one_region_repeats_the_full_map():
    weights = np.zeros((8, 8))
    weights[2:4, 2:4] = 0.25
    rows = region_weights(weights, 2)
    assert np.array_equal(rows[0], weights) and np.array_equal(rows[1], weights)
    with pytest.raises(ValueError, match="1..8 regions"):
        box_proposals(*_two_blobs(), 0)


@pytest.fixture(scope="module")
def box_adapter(tiny_backbone):
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    torch.manual_seed(0)
    adapter = build_adapter(TrainConfig(apm_prompts=("box",), apm_fusion_dim=16), tiny_backbone)
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(5.0)
        adapter.apm.box_head.objectness.weight.mul_(400.0)  # a peaky map: regions that hold most of the weight
        for p in adapter.ips.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return adapter.eval()


def _images(n, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(n)]


@pytest.mark.parametrize("mass_weight", [MASS_WEIGHT, 0.0])
def test_the_kept_candidate_is_the_best_by_predicted_iou_plus_mass(
    tiny_backbone, box_adapter, mass_weight, monkeypatch
):
    from PromiseSegmentLib.model import forward

    monkeypatch.setattr(forward, "MASS_WEIGHT", mass_weight)  # 0: the random decoder's IoU alone picks regions
    engine = InferenceEngine(tiny_backbone, "cpu", capture_taps=True)
    embs = engine.encode(_images(4))
    features = torch.cat([e.features for e in embs])
    taps = [torch.cat(level) for level in zip(*(e.taps for e in embs))]
    with torch.no_grad():
        first = promise_forward(tiny_backbone, box_adapter, features, taps, PromptBatch(), "apm+ips")
        kept = choose_proposal(tiny_backbone, box_adapter, features, first, 3)
        fractions, mass = box_proposals(first.apm.cell_boxes, first.apm.objectness, 3)
        candidates = box_adapter.apm.to_input_frame(fractions)
        assert torch.allclose(candidates[:, 0], first.apm.box, atol=1e-4)  # the global box is the APM's box
        scores = []
        for k in range(candidates.shape[1]):
            user = PromptBatch(boxes=candidates[:, k])
            scores.append(promise_forward(tiny_backbone, box_adapter, features, None, user, "ips").iou[:, 0])
    expected = (torch.stack(scores, 1) + mass_weight * mass).argmax(1)
    for i, k in enumerate(expected.tolist()):
        assert torch.allclose(kept.prompts.boxes[i], candidates[i, k], atol=1e-4)
    if mass_weight == 0.0:
        assert (expected > 0).any(), "the fixture should make a region win, or the test shows nothing"
    assert kept.apm is first.apm  # presence etc. kept


def test_an_adapter_with_proposals_segments_batches_as_one_image_at_a_time_and_round_trips(
    tiny_backbone, box_adapter, tmp_path, monkeypatch
):
    from PromiseSegmentLib.model import forward
    from PromiseSegmentLib.model.adapter import METADATA_KEY, load_adapter, save_adapter

    monkeypatch.setattr(forward, "MASS_WEIGHT", 0.0)  # regions win on this random decoder's IoU

    images = _images(3, seed=1)
    plain = ProMISeModel(InferenceEngine(tiny_backbone, "cpu", capture_taps=True), box_adapter)
    embs = plain.engine.encode(images)
    without = [plain.predict(e, mode="apm+ips") for e in embs]
    box_adapter.apm.set_proposals(3)
    try:
        with_proposals = [plain.predict(e, mode="apm+ips") for e in embs]
        together = plain.predict_masks(embs, embs[0].original_size)
        path = tmp_path / "p.safetensors"
        save_adapter(box_adapter, path)
        loaded = load_adapter(path, tiny_backbone)
    finally:
        box_adapter.apm.set_proposals(0)
    assert loaded.apm.box_proposals == 3 and loaded.apm.config.box_proposals == 3
    older = tmp_path / "older.safetensors"  # written before box proposals existed: no key, none used
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()[METADATA_KEY])
    del meta["apm"]["box_proposals"]
    save_file(tensors, str(older), metadata={METADATA_KEY: json.dumps(meta)})
    assert load_adapter(older, tiny_backbone).apm.box_proposals == 0
    assert (together != np.stack([p.masks[0] for p in with_proposals])).mean() <= 1e-4
    assert any(not np.allclose(a.box, b.box) for a, b in zip(without, with_proposals)), "no box changed"
    with pytest.raises(ValueError, match="0..8"):
        box_adapter.apm.set_proposals(9)
