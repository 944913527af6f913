"""APM/IPS modules, the mode rule, adapter files and short training runs (tiny fixture and LiteMedSAM)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sample_data import make_training_slices

from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.errors import AdapterError, Cancelled, InputError
from PromiseSegmentLib.inference.engine import PromptBatch
from PromiseSegmentLib.model.adapter import METADATA_KEY, load_adapter, read_metadata
from PromiseSegmentLib.model.apm import APM
from PromiseSegmentLib.model.forward import promise_forward
from PromiseSegmentLib.model.ips import IPS
from PromiseSegmentLib.model.promise import ProMISeModel, engine_for
from PromiseSegmentLib.modes import resolve_mode
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.setup import backbone_fingerprint, build_adapter
from PromiseSegmentLib.training.trainer import train_adapter

LIGHT = dict(apm_fusion_dim=32, apm_head_blocks=(1, 1, 1, 1))


def test_paper_sizes_for_vit_b():
    ips = IPS()
    assert sum(p.numel() for p in ips.parameters()) == 1_312_768  # 256*1024+1024 + 1024*1024+1024
    assert ips(torch.randn(2, 256, 64, 64)).shape == (2, 4, 256)
    apm = APM((768,) * 3, 1024).eval()
    with torch.no_grad():
        out = apm([torch.randn(1, 768, 64, 64)] * 3)
    assert out.points.shape == (1, 16, 2) and out.labels.tolist() == [[1] * 8 + [0] * 8] and out.box is None
    assert 0 <= float(out.points.min()) and float(out.points.max()) <= 1024
    assert apm.fusion[0].in_channels == 3 * 768 and apm.point_head.linear.in_features == 512


def _square_taps(gen, n):
    """Taps holding one bright square each at a random place, and its box in a 256 input frame."""
    taps, boxes = torch.zeros(n, 8, 64, 64), torch.zeros(n, 4)
    for k in range(n):
        size = int(torch.randint(8, 24, (1,), generator=gen))
        y, x = (int(v) for v in torch.randint(0, 64 - size, (2,), generator=gen))
        taps[k, :, y : y + size, x : x + size] = 1.0
        boxes[k] = torch.tensor([x, y, x + size, y + size]) * 4.0
    return taps, boxes


def test_box_head_learns_to_localise_and_is_sorted_in_the_input_frame():
    from PromiseSegmentLib.training.batches import Batch
    from PromiseSegmentLib.training.losses import apm_aux_loss, box_iou

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    apm = APM((8,), 256, prompts=("box",), fusion_dim=16, tap_pool=2)
    optim = torch.optim.Adam(apm.parameters(), lr=3e-3)
    for _ in range(150):
        taps, boxes = _square_taps(gen, 8)
        target = torch.nn.functional.interpolate(taps[:, :1], (256, 256))[:, 0]
        batch = Batch(torch.zeros(8, 1), [], target, boxes, torch.ones(8, dtype=torch.bool))
        loss = apm_aux_loss(apm([taps]), batch, 256)
        optim.zero_grad()
        loss.backward()
        optim.step()
    taps, boxes = _square_taps(gen, 16)  # new places and sizes
    with torch.no_grad():
        out = apm.eval()([taps])
    assert out.points is None and out.box.shape == (16, 4) and out.presence.shape == (16,)
    assert bool((out.box[:, 0] <= out.box[:, 2]).all() and (out.box[:, 1] <= out.box[:, 3]).all())
    assert float(out.box.min()) >= 0 and float(out.box.max()) <= 256
    assert float(box_iou(out.box, boxes).iou.mean()) > 0.6  # it found the squares, wherever they were


@pytest.mark.parametrize(
    "mode, points, box, expected",
    [
        ("auto", False, False, "apm+ips"),
        ("auto", True, False, "apm+clicks"),
        ("auto", True, True, "ips"),
        ("auto", False, True, "ips"),
        ("vanilla", True, False, "vanilla"),
        ("apm+clicks", True, False, "apm+clicks"),
    ],
)
def test_the_one_mode_rule(mode, points, box, expected, make_backbone):
    adapter = build_adapter(TrainConfig(**LIGHT), make_backbone(_tiny()))
    assert resolve_mode(mode, adapter, points, box) == expected


def test_auto_gives_the_users_box_to_the_frozen_decoder_where_training_measured_ips_worse(make_backbone):
    adapter = build_adapter(TrainConfig(**LIGHT), make_backbone(_tiny()))
    adapter.training = {"ips_for_user_box": False}
    assert resolve_mode("auto", adapter, False, True) == resolve_mode("auto", adapter, True, True) == "vanilla"
    assert resolve_mode("auto", adapter, False, False) == "apm+ips"  # automatic prompts keep IPS
    assert resolve_mode("auto", adapter, True, False) == "apm+clicks"
    assert resolve_mode("ips", adapter, False, True) == "ips"  # asked for explicitly: IPS it is
    adapter.training = {"ips_for_user_box": True}
    assert resolve_mode("auto", adapter, False, True) == "ips"


def test_mode_rule_refusals(make_backbone):
    with pytest.raises(InputError, match="needs an adapter"):
        resolve_mode("ips", None, True, False)
    ips_only = build_adapter(TrainConfig(use_apm=False), make_backbone(_tiny()))
    assert resolve_mode("auto", ips_only, False, False) == "ips"
    with pytest.raises(InputError, match="with an APM"):
        resolve_mode("apm+ips", ips_only, False, False)
    with pytest.raises(InputError, match="needs prompts"):
        resolve_mode("vanilla", None, False, False)
    with pytest.raises(InputError, match="unknown mode"):
        resolve_mode("magic", None, True, False)


def _tiny():
    from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam

    return build_seeded_sam("tiny", 7)


def test_gradients_reach_apm_and_ips_only(tiny_backbone):
    adapter = build_adapter(TrainConfig(apm_prompts=("box", "points"), **LIGHT), tiny_backbone)
    adapter.ips.mlp[2].weight.data.normal_(0, 0.01)  # away from the zero init, so the APM gets a signal too
    feats = torch.randn(2, 256, 64, 64)
    taps = [torch.randn(2, 64, 64, 64) for _ in range(3)]
    promise_forward(tiny_backbone, adapter, feats, taps, PromptBatch(), "apm+ips").low_res.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.apm.point_head.linear.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.apm.box_head.distances.parameters())
    assert all(p.grad is not None for p in adapter.ips.parameters())
    assert all(p.grad is None for p in tiny_backbone.sam.parameters())


def test_zero_shift_with_the_users_prompts_is_the_plain_backbone(tiny_backbone, rng, make_image):
    image = make_image(rng, 150, 130)
    adapter = build_adapter(TrainConfig(use_apm=False), tiny_backbone)  # IPS starts at zero
    vanilla = ProMISeModel(engine_for(tiny_backbone, None, "cpu"))
    ips_model = ProMISeModel(engine_for(tiny_backbone, adapter, "cpu"), adapter)
    prompts = Prompts(points=[[60, 70], [10, 10]], labels=[1, 0])
    emb = vanilla.engine.encode([image])[0]
    a = vanilla.engine.predict(emb, prompts, multimask_output=True)
    b = ips_model.predict(emb, prompts, mode="ips")
    np.testing.assert_array_equal(a.logits[:1], b.logits)  # SAM ViT decodes token 1 = first multimask output


def test_litemedsam_decodes_token_zero_and_refuses_points_alone(lite_medsam, spleen_cases):
    from PromiseSegmentLib.data.prompts import mask_box

    adapter = build_adapter(TrainConfig(use_apm=False), lite_medsam)
    model = ProMISeModel(engine_for(lite_medsam, adapter, "cpu", precision="fp32"), adapter)  # exact comparison
    case = spleen_cases[1]
    emb = model.engine.encode([case.rgb])[0]
    box = Prompts(box=mask_box(case.mask))
    single = model.engine.predict(emb, box, multimask_output=False)  # token 0
    np.testing.assert_array_equal(single.logits, model.predict(emb, box, mode="ips").logits)
    with pytest.raises(InputError, match="box prompts only"):
        model.predict(emb, Prompts(points=[[200, 200]], labels=[1]), mode="ips")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_backbone):
    pairs = make_training_slices([1, 2], empty_share=0.0)[:10]
    cases = [Case(str(i), rgb, m) for i, (rgb, m) in enumerate(pairs)]
    out = tmp_path_factory.mktemp("train") / "a.safetensors"
    engine = engine_for(tiny_backbone, None, "cpu")
    before = backbone_fingerprint(tiny_backbone.sam)
    cfg = TrainConfig(
        epochs=4,
        batch_size=4,
        lr=3e-3,
        augment=False,
        cache_features=True,
        apm_prompts=("box", "points"),
        apm_warmup_epochs=1,
        **LIGHT,
    )
    result = train_adapter(engine, cases[2:], cases[:2], cfg, out)
    assert backbone_fingerprint(tiny_backbone.sam) == before
    return result, out, cases, cfg


def test_training_lowers_the_loss_and_writes_an_adapter(trained):
    result, out, _, _ = trained
    joint = [row.loss for row in result.history if row.phase == "joint"]
    assert joint[-1] < joint[0] and result.history[0].phase == "apm warm-up"
    meta = read_metadata(out).to_json()
    assert meta["format_version"] == 2
    assert meta["backbone"] == {
        "name": "tiny_random",
        "family": "sam_vit",
        "identity": "seed:7",
        "image_size": 1024,
        "tap_channels": [64, 64, 64],
    }
    assert meta["apm"]["prompts"] == ["box", "points"] and meta["apm"]["slot_labels"] == [1] * 8 + [0] * 8
    assert meta["ips"]["hidden"] == 1024 and meta["training"]["mode"] == "apm+ips"
    assert meta["training"]["best_val_dice"] == pytest.approx(result.best_val_dice)
    t = meta["training"]
    assert t["ips_for_user_box"] == (t["val_box_dice"] >= t["val_frozen_box_dice"])
    assert not (out.parent / (out.name + ".state.pt")).exists()  # a finished run keeps no resumable state


def test_metadata_is_parsed_once_into_typed_records(trained, tmp_path):
    from PromiseSegmentLib.model.adapter_format import AdapterMetadata, BackboneRecord
    from PromiseSegmentLib.model.module_configs import ApmConfig, IpsConfig

    result, out, _, _ = trained
    meta = read_metadata(out)
    assert isinstance(meta, AdapterMetadata) and isinstance(meta.backbone, BackboneRecord)
    assert isinstance(meta.apm, ApmConfig) and isinstance(meta.ips, IpsConfig)
    assert meta.apm == result.adapter.apm.config and meta.apm.prompts == ("box", "points")
    assert meta.intensity == result.adapter.intensity and meta.best_val_dice == pytest.approx(result.best_val_dice)
    for table, message in (
        (dict(meta.to_json()["apm"], slots=3), "APM configuration has unknown keys slots"),
        ({k: v for k, v in meta.to_json()["apm"].items() if k != "fusion_dim"}, "APM configuration lacks fusion_dim"),
    ):
        bad = tmp_path / "bad.safetensors"
        with safe_open(str(out), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(bad), metadata={METADATA_KEY: json.dumps(dict(meta.to_json(), apm=table))})
        with pytest.raises(AdapterError, match=message):
            read_metadata(bad)


def test_training_chooses_the_box_refinement_on_validation_and_stores_it(trained, tiny_backbone):
    from PromiseSegmentLib.training.selection import REFINEMENT_GAIN, REFINEMENTS

    result, out, _, _ = trained
    meta = read_metadata(out).to_json()
    tried = meta["training"]["box_refinement_val_dice"]
    by_choice = {(t["steps"], t["margin"]): t["val_dice"] for t in tried}
    assert list(by_choice) == list(REFINEMENTS) and all(0.0 <= d <= 1.0 for d in by_choice.values())
    best = max(REFINEMENTS, key=lambda c: by_choice[c] - (REFINEMENT_GAIN if c[0] else 0.0))
    chosen = (meta["apm"]["box_refinement"], meta["apm"]["refinement_margin"])
    assert chosen == best == (result.adapter.apm.box_refinement, result.adapter.apm.refinement_margin)
    loaded = load_adapter(out, tiny_backbone).apm
    assert (loaded.box_refinement, loaded.refinement_margin) == chosen
    assert by_choice[(0, 0.0)] == pytest.approx(result.best_val_dice)  # no refinement: what selection measured
    from PromiseSegmentLib.cli.train import refinement_summary

    line = refinement_summary(result.adapter)
    assert f"without {by_choice[(0, 0.0)]:.3f}" in line and f"selection Dice {by_choice[best]:.3f}" in line


def test_adapter_round_trip_gives_identical_outputs(trained, tiny_backbone):
    result, out, cases, _ = trained
    loaded = load_adapter(out, tiny_backbone)
    m1 = ProMISeModel(engine_for(tiny_backbone, result.adapter, "cpu"), result.adapter)
    m2 = ProMISeModel(engine_for(tiny_backbone, loaded, "cpu"), loaded)
    emb = m1.engine.encode([cases[0].rgb])[0]
    p1, p2 = m1.predict(emb, mode="apm+ips"), m2.predict(emb, mode="apm+ips")
    np.testing.assert_array_equal(p1.logits, p2.logits)
    np.testing.assert_array_equal(p1.points, p2.points)
    np.testing.assert_array_equal(p1.box, p2.box)
    assert p1.points.shape == (16, 2) and p1.box[0] <= p1.box[2] and p1.box[1] <= p1.box[3]
    clicks = m2.predict(emb, Prompts(points=[[5, 5]], labels=[0]), mode="apm+clicks")
    assert clicks.points.shape == (17, 2)


def test_mismatched_backbone_is_refused(trained, lite_medsam, tiny_backbone, make_backbone):
    _, out, _, _ = trained
    with pytest.raises(AdapterError, match="trained on backbone tiny_random but the loaded backbone is lite_medsam"):
        load_adapter(out, lite_medsam)
    other = make_backbone(tiny_backbone.sam, identity="0" * 64)
    with pytest.raises(AdapterError, match="allow-backbone-mismatch"):
        load_adapter(out, other)
    assert load_adapter(out, other, allow_mismatch=True).apm is not None
    out.with_suffix(".bad").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterError, match="not a readable adapter"):
        load_adapter(out.with_suffix(".bad"))


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"format_version": 1, "sam_variant": "vit_b"}, "format 1 .*retrain"),
        ({"format_version": 3}, "update PromiseSegment"),
        ({"format_version": "2"}, "no integer format_version"),
        ({"format_version": 2, "apm": None}, "lacks backbone"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_adapter_metadata_names_the_file(tmp_path, meta, message):
    path = tmp_path / "old.safetensors"
    save_file(
        {"ips.x": torch.zeros(1)},
        str(path),
        metadata={METADATA_KEY: meta if isinstance(meta, str) else json.dumps(meta)},
    )
    with pytest.raises(AdapterError, match=message) as err:
        read_metadata(path)
    assert str(path) in str(err.value)


def test_nan_weights_are_refused(trained, tmp_path, tiny_backbone):
    result, _, _, _ = trained
    from PromiseSegmentLib.model.adapter import save_adapter

    state = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in result.adapter.modules().items()}
    state["ips"]["mlp.0.weight"][0, 0] = float("nan")
    save_adapter(result.adapter, tmp_path / "nan.safetensors", state)
    with pytest.raises(AdapterError, match="NaN"):
        load_adapter(tmp_path / "nan.safetensors", tiny_backbone)


def test_resume_after_an_interruption_restores_the_exact_state(trained, tiny_backbone, tmp_path):
    from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache

    _, _, cases, cfg = trained
    engine = engine_for(tiny_backbone, None, "cpu", cache=EmbeddingCache())  # the three runs encode once
    full = train_adapter(engine, cases[2:], cases[:2], cfg, tmp_path / "full.safetensors")
    epochs_done = []

    def cancel_after_two():
        return len(epochs_done) >= 2

    with pytest.raises(Cancelled):
        train_adapter(
            engine,
            cases[2:],
            cases[:2],
            cfg,
            tmp_path / "r.safetensors",
            progress=lambda s: s.record and epochs_done.append(s.record.epoch),
            cancel=cancel_after_two,
        )
    state = torch.load(str(tmp_path / "r.safetensors") + ".state.pt", weights_only=True)
    assert state["epoch"] == 1 and state["optim"]["state"]  # Adam moments were saved
    resumed = train_adapter(engine, cases[2:], cases[:2], cfg, tmp_path / "r.safetensors", resume=True)
    assert [r.loss for r in resumed.history] == pytest.approx([r.loss for r in full.history], rel=1e-5)


def test_a_training_set_of_empty_masks_is_refused(tiny_backbone):
    cases = [Case(str(i), np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), bool)) for i in range(3)]
    with pytest.raises(InputError, match="every training mask is empty"):
        train_adapter(engine_for(tiny_backbone, None, "cpu"), cases, [], TrainConfig(epochs=1))


@pytest.mark.parametrize(
    "bad",
    [
        dict(epochs=0),
        dict(batch_size=0),
        dict(apm_fusion_dim=0),
        dict(n_points=0),
        dict(n_positive=17),
        dict(lr=float("nan")),
        dict(user_prompt="scribble"),
        dict(lr_schedule="linear"),
    ],
)
def test_bad_training_options_are_refused_before_any_work(bad):
    with pytest.raises(InputError):
        TrainConfig(**bad).check()


def test_warm_up_flips_keep_taps_target_and_boxes_consistent():
    from PromiseSegmentLib.training.batches import Batch, flip_batch

    target = torch.zeros(1, 256, 256)
    target[0, 40:100, 10:60] = 1  # rows 40..99, cols 10..59 of the padded input square (size 256 here)
    taps = [target[:, None, ::4, ::4].clone()]  # a 64x64 map of the same object
    batch = Batch(torch.zeros(1, 1), taps, target, torch.tensor([[10.0, 40.0, 60.0, 100.0]]), torch.tensor([True]))
    seen = set()
    for seed in range(12):
        out = flip_batch(batch, torch.Generator().manual_seed(seed), 256)
        ys, xs = torch.nonzero(out.target[0], as_tuple=True)
        assert out.boxes[0].tolist() == [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]
        assert torch.equal(out.taps[0][0, 0], out.target[0, ::4, ::4]) or torch.equal(
            out.taps[0][0, 0], out.target[0, 3::4, 3::4]
        )  # the taps moved with the target
        seen.add(tuple(out.boxes[0].tolist()))
    assert len(seen) == 4 and torch.equal(batch.target, target)  # all four flips occur; the input is untouched


def test_apm_joint_lr_zero_keeps_the_warmed_up_apm_and_still_trains_ips(trained, tiny_backbone):
    from PromiseSegmentLib.training.trainer import Trainer

    _, _, cases, cfg = trained
    frozen = TrainConfig(**{**cfg.__dict__, "epochs": 2, "apm_warmup_epochs": 1, "apm_joint_lr": 0.0})
    trainer = Trainer(engine_for(tiny_backbone, None, "cpu"), cases[2:], cases[:2], frozen, None)
    trainer.epoch(0, None)  # warm-up: the APM learns
    apm = {k: v.detach().clone() for k, v in trainer.adapter.apm.named_parameters()}
    ips = {k: v.detach().clone() for k, v in trainer.adapter.ips.named_parameters()}
    trainer.epoch(1, None)  # joint: IPS learns, the APM's weights stay (BatchNorm statistics still follow the data)
    assert all(torch.equal(v, dict(trainer.adapter.apm.named_parameters())[k]) for k, v in apm.items())
    assert any(not torch.equal(v, dict(trainer.adapter.ips.named_parameters())[k]) for k, v in ips.items())
    assert all(p.grad is None for p in trainer.adapter.apm.parameters())  # not even computed: no wasted backward
    trainer.epoch(0, True)  # a warm-up epoch trains it again
    assert any(not torch.equal(v, dict(trainer.adapter.apm.named_parameters())[k]) for k, v in apm.items())


def test_a_deadline_ends_the_warm_up_early_enough_for_a_joint_epoch(trained, tiny_backbone):
    import time

    from PromiseSegmentLib.training.trainer import Trainer

    _, _, cases, cfg = trained
    long = TrainConfig(**{**cfg.__dict__, "epochs": 6, "apm_warmup_epochs": 5})
    engine = engine_for(tiny_backbone, None, "cpu")
    # an hour left, but one joint epoch is estimated at two: the warm-up stops after its first epoch
    trainer = Trainer(engine, cases[2:], cases[:2], long, None, deadline=time.monotonic() + 3600, joint_seconds=7200)
    result = trainer.run(False, None, None)
    assert [r.phase for r in result.history] == ["apm warm-up", "joint"]
    roomy = Trainer(engine, cases[2:], cases[:2], long, None, deadline=time.monotonic() + 3600, joint_seconds=1)
    assert [r.phase for r in roomy.run(False, None, None).history] == ["apm warm-up"] * 5 + ["joint"]


def test_low_res_box_is_the_foreground_s_pixel_edges_inside_the_image():
    from PromiseSegmentLib.model.forward import low_res_box

    low = torch.full((1, 1, 256, 256), -5.0)
    low[0, 0, 10:21, 30:41] = 5.0  # rows 10..20, columns 30..40
    low[0, 0, 200:, :] = 5.0  # padding below an image 1024 wide and 600 high (600 / 4 = 150 rows)
    np.testing.assert_array_equal(low_res_box(low, (600, 1024), 1024, 0.0)[0].numpy(), [120, 40, 164, 84])
    np.testing.assert_array_equal(low_res_box(low, (256, 256), 256, 0.0)[0].numpy(), [0, 10, 256, 256])
    grown = low_res_box(low, (600, 1024), 1024, 0.0, margin=0.25)[0].numpy()  # 44 x 44 -> 11 more each side
    np.testing.assert_array_equal(grown, [109, 29, 175, 95])
    np.testing.assert_array_equal(low_res_box(low, (600, 1024), 1024, 0.0, margin=1.0)[0].numpy()[:2], [76, 0])
    assert low_res_box(torch.full((1, 1, 256, 256), -1.0), (256, 256), 256, 0.0) is None


def test_box_refinement_decodes_again_with_the_first_mask_s_box(tiny_backbone, rng, make_image):
    from PromiseSegmentLib.model.forward import low_res_box

    adapter = build_adapter(TrainConfig(apm_prompts=("box",), **LIGHT), tiny_backbone)
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(5.0)
    engine = engine_for(tiny_backbone, adapter, "cpu")
    model = ProMISeModel(engine, adapter)
    emb = engine.encode([make_image(rng, 150, 130)])[0]
    assert (adapter.apm.box_refinement, adapter.apm.refinement_margin) == (0, 0.0)  # the default: none
    once = model.predict(emb, mode="apm+ips")
    adapter.apm.set_refinement(1, 0.1)
    twice = model.predict(emb, mode="apm+ips")
    first_mask_box = low_res_box(torch.as_tensor(once.low_res)[None], emb.input_size, 1024, engine.mask_threshold, 0.1)
    assert first_mask_box is not None  # the untrained model still gives some mask to refine from
    expected = tiny_backbone.spec.from_input_frame(first_mask_box.numpy().reshape(2, 2), emb.original_size)
    np.testing.assert_allclose(twice.box, expected.reshape(4), atol=1e-4)
    assert not np.allclose(once.box, twice.box)  # the APM's own box was replaced ...
    user = model.predict(emb, Prompts(box=twice.box), mode="ips")
    np.testing.assert_array_equal(user.masks, twice.masks)  # ... and decoded as a user's box with IPS would be
    for steps, margin in ((-1, 0.0), (4, 0.0), (1, -0.1), (1, 1.5)):
        with pytest.raises(ValueError, match="box refinement"):
            adapter.apm.set_refinement(steps, margin)
    with pytest.raises(ValueError, match="box head"):
        APM((8,), 256, prompts=("points",), fusion_dim=16, box_refinement=1)


def test_cosine_schedule_anneals_each_phase_and_reaches_the_optimiser(tiny_backbone):
    from PromiseSegmentLib.training.config import lr_factor
    from PromiseSegmentLib.training.trainer import Trainer

    cfg = TrainConfig(epochs=6, apm_warmup_epochs=2, lr=1e-3, lr_schedule="cosine", apm_joint_lr=0.5)
    warm = [lr_factor(cfg, e, True) for e in range(2)]
    joint = [lr_factor(cfg, e, False) for e in range(2, 6)]
    assert warm == pytest.approx([1.0, 0.5]) and joint == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    assert lr_factor(TrainConfig(), 7, False) == 1.0  # constant by default
    pairs = make_training_slices([1], empty_share=0.0)[:4]
    cases = [Case(str(i), rgb, m) for i, (rgb, m) in enumerate(pairs)]
    trainer = Trainer(
        engine_for(tiny_backbone, None, "cpu"),
        cases[1:],
        cases[:1],
        TrainConfig(
            **{
                **cfg.__dict__,
                "augment": False,
                "cache_features": True,
                "batch_size": 4,
                "apm_prompts": ("box",),
                **LIGHT,
            }
        ),
        None,
    )
    trainer.epoch(3, None)  # the second joint epoch
    assert [g["lr"] for g in trainer.optim.param_groups] == pytest.approx([1e-3 * 0.8535534 * 0.5, 1e-3 * 0.8535534])


def test_augmented_copies_are_encoded_once_each_reproducible_and_reused(tiny_backbone, tmp_path):
    from PromiseSegmentLib.training.features import StoredFeatures

    pairs = make_training_slices([1, 2], empty_share=0.0)[:4]
    cases = [Case(str(i), rgb, m) for i, (rgb, m) in enumerate(pairs)]
    engine = engine_for(tiny_backbone, None, "cpu")
    encoded = []
    encode = engine.encode
    engine.encode = lambda images, *a, **k: encoded.append(len(images)) or encode(images, *a, **k)

    def store(seed, folder):
        return StoredFeatures(engine, None, cases[:3], cases[3:], 2, seed, torch.Generator().manual_seed(5), folder)

    src = store(0, tmp_path / "a")
    assert src.prepare() == 3 * 3 + 1 and sum(encoded) == 3 * 3 + 1  # each version of each image once
    versions = [src._read(r, ()) for r in range(3)]  # image 0: as given, then its two augmented copies
    assert not torch.equal(versions[0].features, versions[1].features)  # really augmented
    assert not torch.equal(versions[1].features, versions[2].features)
    draws = src.get([0, 1, 2] * 8, ("taps", "target", "box"))
    assert all(d.features is None for d in draws)  # the warm-up reads no embeddings
    src.close(finished=False)
    again = store(0, tmp_path / "a")
    encoded.clear()
    assert again.prepare() == 0 and not encoded  # an interrupted run's records are reused
    assert torch.equal(again._read(1, ()).features, versions[1].features)
    again.close(finished=False)
    other = store(1, tmp_path / "b")
    other.prepare()
    assert torch.equal(other._read(0, ()).features, versions[0].features)  # the image as given
    assert not torch.equal(other._read(1, ()).features, versions[1].features)  # copies follow the seed
    other.close(finished=True)
    assert (tmp_path / "b").exists()  # a folder the user chose is kept
    owned = StoredFeatures(engine, None, cases[:3], [], 0, 0, torch.Generator())
    owned.prepare()
    assert owned.folder.is_dir()
    owned.close(finished=True)
    assert not owned.folder.exists()  # a finished run removes the cache it made


def test_augmented_copies_need_the_feature_cache():
    with pytest.raises(InputError, match="--augmented-copies needs --cache-features"):
        TrainConfig(augment=False, cache_features=False, augmented_copies=2).check()
    with pytest.raises(InputError, match="--augmented-copies must be"):
        TrainConfig(augment=False, cache_features=True, augmented_copies=-1).check()
    TrainConfig(augment=False, cache_features=True, augmented_copies=2).check()


def test_augment_takes_read_only_images_silently():
    """Cached and memory-mapped data sets hand out read-only arrays; augmenting them must not warn."""
    import warnings

    from PromiseSegmentLib.training.augment import augment

    rgb, mask = make_training_slices([1], empty_share=0.0)[0]
    rgb, mask = np.array(rgb), np.array(mask)
    rgb.setflags(write=False)
    mask.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out_rgb, out_mask = augment(rgb, mask, torch.Generator().manual_seed(0))
    assert out_rgb.shape == rgb.shape and out_rgb.dtype == np.uint8 and out_mask.dtype == mask.dtype
    assert out_mask.any()
