"""The engine must reproduce segment-anything's own SamPredictor (same weights, same prompts)."""

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.model.decoder import decode_masks

PROMPTS = {
    "points": dict(
        point_coords=np.array([[70.0, 80.0], [20.0, 150.0], [140.0, 40.0]]), point_labels=np.array([1, 0, 1])
    ),
    "box": dict(box=np.array([30.0, 40.0, 160.0, 170.0])),
    "both": dict(point_coords=np.array([[90.0, 95.0]]), point_labels=np.array([1]), box=np.array([25, 30, 170, 180.0])),
}


def _compare(backbone, image: np.ndarray, multimask: bool):
    sam = backbone.sam
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    engine = InferenceEngine(backbone, device="cpu")
    emb = engine.encode([image])[0]
    assert torch.equal(emb.features, predictor.features)
    for name, kw in PROMPTS.items():
        logits, iou, low = predictor.predict(multimask_output=multimask, return_logits=True, **kw)
        masks, _, _ = predictor.predict(multimask_output=multimask, **kw)
        pred = engine.predict(
            emb, Prompts(kw.get("point_coords"), kw.get("point_labels"), kw.get("box")), multimask_output=multimask
        )
        assert np.abs(pred.low_res - low).max() <= 1e-4, name
        assert np.abs(pred.logits - logits).max() <= 1e-4, name
        assert np.abs(pred.iou - iou).max() <= 1e-4, name
        np.testing.assert_array_equal(pred.masks, masks, err_msg=name)
        # the previous low-res logits fed back as a mask prompt
        logits2, _, low2 = predictor.predict(mask_input=low[:1], multimask_output=False, return_logits=True, **kw)
        pred2 = engine.predict(
            emb,
            Prompts(kw.get("point_coords"), kw.get("point_labels"), kw.get("box"), mask_logits=pred.low_res[:1]),
            multimask_output=False,
        )
        assert np.abs(pred2.logits - logits2).max() <= 1e-4, name


@pytest.mark.parametrize("multimask", [True, False])
def test_tiny_architecture_matches_sam_predictor(tiny_backbone, make_image, rng, multimask):
    _compare(tiny_backbone, make_image(rng, 211, 187), multimask)  # odd, non-square size


@pytest.mark.slow
def test_vit_b_architecture_matches_sam_predictor(make_backbone, make_image, rng):
    sam = build_seeded_sam("vit_b", 3)  # the real ViT-B layout, random weights
    _compare(make_backbone(sam, "sam_vit_b"), make_image(rng, 190, 240), multimask=True)


def test_batched_encoding_equals_one_by_one(tiny_backbone, make_image, rng):
    images = [make_image(rng, 120, 150), make_image(rng, 200, 90), make_image(rng, 64, 64)]
    single = InferenceEngine(tiny_backbone, device="cpu", batch_size=1).encode(images)
    batched = InferenceEngine(tiny_backbone, device="cpu", batch_size=3).encode(images)
    for a, b in zip(single, batched):
        assert a.input_size == b.input_size and a.original_size == b.original_size
        assert (a.features - b.features).abs().max() <= 1e-4


@pytest.mark.parametrize("multimask", [True, False])
def test_zero_shift_decoder_equals_mask_decoder(tiny_sam, rng, multimask):
    feats = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    points = (torch.rand(3, 4, 2) * 1024, torch.tensor([[1, 0, 1, 1]] * 3))
    sparse, dense = tiny_sam.prompt_encoder(points=points, boxes=None, masks=None)
    ref = tiny_sam.mask_decoder(feats, tiny_sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask)
    for shift in (None, torch.zeros(1, 4, 256), torch.zeros(3, 4, 256)):
        out = decode_masks(tiny_sam, feats, sparse, dense, multimask, shift)
        assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    shifted = decode_masks(tiny_sam, feats, sparse, dense, multimask, torch.full((1, 4, 256), 0.5))
    assert not torch.allclose(shifted[0], ref[0])  # the shift really reaches the masks
