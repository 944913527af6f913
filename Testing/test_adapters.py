"""APM/IPS modules, adapter files, modes and a short training run on the tiny backbone."""
import numpy as np
import pytest
import torch

from PromiseSegmentLib.adapter import AdapterError, load_adapter, read_metadata
from PromiseSegmentLib.apm import APM
from PromiseSegmentLib.datasets import Case
from PromiseSegmentLib.engine import Prompts
from PromiseSegmentLib.ips import IPS
from PromiseSegmentLib.promise import ProMISeModel, engine_for, promise_low_res
from PromiseSegmentLib.sam_models import ARCHITECTURES
from PromiseSegmentLib.sample_data import make_training_slices
from PromiseSegmentLib.training import TrainConfig, build_adapter, sam_fingerprint, train_adapter

LIGHT = dict(apm_fusion_dim=32, apm_head_blocks=(1, 1, 1, 1))


def test_vit_b_sizes_match_the_design():
    ips = IPS()
    assert sum(p.numel() for p in ips.parameters()) == 1_312_768  # 256*1024+1024 + 1024*1024+1024
    assert ips(torch.randn(2, 256, 64, 64)).shape == (2, 4, 256)
    assert ARCHITECTURES["vit_b"].apm_blocks == (5, 8, 11)  # blocks 6, 9, 12
    assert ARCHITECTURES["vit_l"].apm_blocks == (11, 17, 23) and ARCHITECTURES["vit_h"].apm_blocks == (15, 23, 31)
    apm = APM(768).eval()
    with torch.no_grad():
        pts, labels = apm([torch.randn(1, 768, 64, 64)] * 3)
    assert pts.shape == (1, 16, 2) and labels.tolist() == [[1] * 8 + [0] * 8]
    assert 0 <= float(pts.min()) and float(pts.max()) <= 1024
    assert apm.fusion[0].in_channels == 3 * 768 and apm.points.in_features == 512


def test_gradients_reach_apm_and_ips_only(tiny_sam):
    adapter = build_adapter(TrainConfig(**LIGHT), "tiny", "x")
    adapter.ips.mlp[2].weight.data.normal_(0, 0.01)  # away from the zero init, so the APM gets a signal too
    for p in tiny_sam.parameters():
        p.requires_grad_(False)
    feats = torch.randn(2, 256, 64, 64)
    blocks = [torch.randn(2, 64, 64, 64) for _ in range(3)]
    promise_low_res(tiny_sam, adapter, feats, blocks).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.apm.points.parameters())
    assert all(p.grad is not None for p in adapter.ips.parameters())
    assert all(p.grad is None for p in tiny_sam.parameters())


def test_zero_shift_with_truth_points_is_vanilla_sam(tiny_sam, rng):
    from conftest import realistic_image

    image = realistic_image(rng, 150, 130)
    adapter = build_adapter(TrainConfig(use_apm=False), "tiny", "x")  # IPS starts at zero
    vanilla = ProMISeModel(engine_for(tiny_sam, "tiny", None, "cpu"), "tiny", "x")
    ips_model = ProMISeModel(engine_for(tiny_sam, "tiny", adapter, "cpu"), "tiny", "x", adapter)
    prompts = Prompts(points=[[60, 70], [10, 10]], labels=[1, 0])
    emb = vanilla.engine.encode([image])[0]
    a = vanilla.engine.predict(emb, prompts, multimask_output=True)
    b = ips_model.predict(emb, prompts, mode="ips")
    np.testing.assert_array_equal(a.logits[:1], b.logits)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sam):
    pairs = make_training_slices([1, 2], empty_share=0.0)[:10]
    cases = [Case(str(i), rgb, m) for i, (rgb, m) in enumerate(pairs)]
    out = tmp_path_factory.mktemp("train") / "a.safetensors"
    engine = engine_for(tiny_sam, "tiny", None, "cpu")
    before = sam_fingerprint(tiny_sam)
    cfg = TrainConfig(epochs=4, batch_size=4, lr=3e-3, augment=False, cache_features=True, **LIGHT)
    result = train_adapter(engine, "tiny", "seed:test", cases[2:], cases[:2], cfg, out)
    assert sam_fingerprint(tiny_sam) == before
    return result, out, cases, cfg


def test_training_lowers_the_loss_and_writes_an_adapter(trained):
    result, out, _, _ = trained
    losses = [row["loss"] for row in result.history]
    assert losses[-1] < losses[0]
    meta = read_metadata(out)
    assert meta["sam_variant"] == "tiny" and meta["sam_checkpoint_sha256"] == "seed:test"
    assert meta["apm"]["slot_labels"] == [1] * 8 + [0] * 8 and meta["ips"]["hidden"] == 1024
    assert meta["training"]["best_val_dice"] == pytest.approx(result.best_val_dice)


def test_adapter_round_trip_gives_identical_outputs(trained, tiny_sam, tmp_path):
    result, out, cases, _ = trained
    loaded = load_adapter(out, "tiny", "seed:test")
    m1 = ProMISeModel(engine_for(tiny_sam, "tiny", result.adapter, "cpu"), "tiny", "seed:test", result.adapter)
    m2 = ProMISeModel(engine_for(tiny_sam, "tiny", loaded, "cpu"), "tiny", "seed:test", loaded)
    emb = m1.engine.encode([cases[0].rgb])[0]
    p1, p2 = m1.predict(emb, mode="apm+ips"), m2.predict(emb, mode="apm+ips")
    np.testing.assert_array_equal(p1.logits, p2.logits)
    np.testing.assert_array_equal(p1.points, p2.points)
    assert p1.points.shape == (16, 2)
    clicks = m2.predict(emb, Prompts(points=[[5, 5]], labels=[0]), mode="apm+clicks")
    assert clicks.points.shape == (17, 2)


def test_mismatched_backbone_is_refused(trained):
    _, out, _, _ = trained
    with pytest.raises(AdapterError, match="trained on SAM tiny but the loaded SAM is vit_b"):
        load_adapter(out, "vit_b", "seed:test")
    with pytest.raises(AdapterError, match="allow-backbone-mismatch"):
        load_adapter(out, "tiny", "0" * 64)
    assert load_adapter(out, "tiny", "0" * 64, allow_mismatch=True).apm is not None
    out.with_suffix(".bad").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="not a readable adapter"):
        load_adapter(out.with_suffix(".bad"))


def test_resume_restores_the_exact_optimizer_state(trained, tiny_sam, tmp_path):
    _, _, cases, cfg = trained
    engine = engine_for(tiny_sam, "tiny", None, "cpu")
    full = train_adapter(engine, "tiny", "s", cases[2:], cases[:2], cfg, tmp_path / "full.safetensors")
    cfg_half = TrainConfig(**{**cfg.__dict__, "epochs": 2})
    train_adapter(engine, "tiny", "s", cases[2:], cases[:2], cfg_half, tmp_path / "r.safetensors")
    state = torch.load(str(tmp_path / "r.safetensors") + ".state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["optim"]["state"]  # Adam moments were saved
    resumed = train_adapter(engine, "tiny", "s", cases[2:], cases[:2], cfg, tmp_path / "r.safetensors", resume=True)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in full.history], rel=1e-5)
