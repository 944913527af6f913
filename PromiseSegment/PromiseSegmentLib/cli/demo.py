"""The ``demo`` command: the whole workflow offline on bundled real CT (train, segment, report)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from PromiseSegmentLib.cli.arg_types import (
    non_negative_int,
    positive_float,
    positive_int,
)
from PromiseSegmentLib.cli.arguments import (
    add_backbone_args,
    announce,
    engine_options,
)
from PromiseSegmentLib.cli.train import PhaseProgress, refinement_summary
from PromiseSegmentLib.cli.validation import preflight

DEMO_TEST = ("10035_spleen_49", "10038_spleen_14", "10039_spleen_59")  # 3 patients never seen in training


def bundled_spleen() -> Path:
    """Real CT slices with expert spleen masks shipped with the package (MSD Task09, CC-BY-SA 4.0)."""
    return Path(__file__).resolve().parents[1] / "data" / "bundled" / "ct-spleen"


def cmd_demo(args) -> int:
    """The main job on real data, offline: train an APM+IPS adapter on bundled spleen CT slices of 12
    patients, segment the slices of 3 other patients automatically, write .seg.nrrd files, overlays at
    native resolution and a report with Dice against the expert masks."""
    from PromiseSegmentLib.atomic_write import write_bytes_atomically
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.data.datasets import load_image_folder
    from PromiseSegmentLib.model.promise import ProMISeModel, engine_for
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.trainer import train_adapter

    out = Path(args.out)  # checked by validation._demo: a folder, empty unless --overwrite
    preflight(args.device)
    cfg = TrainConfig(
        epochs=args.warmup + args.epochs,
        apm_warmup_epochs=args.warmup,
        lr=args.lr,
        batch_size=4,
        augment=False,
        cache_features=True,
        apm_fusion_dim=64,
        apm_tap_pool=2,
        target_name="Spleen",
        intensity={"kind": "rgb"},
    )
    cfg.check()
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    print(f"backbone: {backbone.spec.description}")
    cases = load_image_folder(bundled_spleen())
    test = [c for c in cases if c.id in DEMO_TEST]
    rest = [c for c in cases if c.id not in DEMO_TEST]
    fit, select = rest[:-3], rest[-3:]
    bars = PhaseProgress()
    try:
        engine = engine_for(backbone, None, args.device, **engine_options(args))
        result = train_adapter(engine, fit, select, cfg, out / "spleen_adapter.safetensors", progress=bars)
    finally:
        bars.close()
    model = ProMISeModel(engine_for(backbone, result.adapter, args.device, **engine_options(args)), result.adapter)
    announce(model.engine)
    lines, dices = _demo_segment(model, test, out)
    report = _demo_report(backbone, fit, select, result, lines, dices, time.time() - start)
    write_bytes_atomically(out / "report.txt", report.encode())
    print(report + f"wrote {out}/*.seg.nrrd, *_overlay.png, spleen_adapter.safetensors, report.txt")
    return 0


def _demo_report(backbone, fit, select, result, lines, dices, seconds: float) -> str:
    return (
        f"PromiseSegment demo on real CT (bundled MSD spleen slices, CC-BY-SA 4.0)\n"
        f"backbone: {backbone.name} (frozen), weights SHA-256 {backbone.identity}\n"
        f"adapter: APM (box) + IPS trained on {len(fit)} slices of {len({c.id.split('_')[0] for c in fit})} "
        f"patients, selected on {len(select)} more "
        f"({len(result.history)} epochs, best selection Dice {result.best_val_dice:.3f}"
        f"{refinement_summary(result.adapter)})\n"
        f"automatic segmentation (no clicks) of 3 patients not used for training:\n"
        + "\n".join(lines)
        + f"\nmean Dice {np.mean(dices):.3f}\n"
        f"red: prediction, green: expert mask in the *_overlay.png files (native 512 x 512)\n"
        f"time: {seconds:.0f} s\n"
    )


def _demo_segment(model, test, out: Path):
    """Segment the held-out patients automatically; write each result and overlay; (report lines, Dices)."""
    from PromiseSegmentLib.data.volume_io import Segment, overlay_rgb, read_volume, save_png, write_segmentation
    from PromiseSegmentLib.evaluation.metrics import dice

    lines, dices = [], []
    for case in test:
        vol = read_volume(bundled_spleen() / "images" / f"{case.id}.jpg")
        mask = model.segment_volume(vol.array, vol.ijk_to_ras, mode="apm+ips")
        d = dice(mask[0] > 0, case.mask)
        dices.append(d)
        write_segmentation(
            out / f"{case.id}.seg.nrrd", mask, vol.ijk_to_ras, [Segment("Spleen", model.target_color)], overwrite=True
        )
        save_png(out / f"{case.id}_overlay.png", overlay_rgb(vol.array[0], [mask[0] > 0, case.mask]))
        lines.append(
            f"  {case.id}: Dice {d:.3f}  ({int(mask.sum())} voxels predicted, {int(case.mask.sum())} in the "
            f"expert mask)"
        )
        print(lines[-1])
    return lines, dices


def add_demo_command(sub) -> None:
    p = sub.add_parser("demo", help="the whole ProMISe workflow offline on bundled real CT (train, segment, report)")
    p.add_argument("--out", default="promise-demo", help="output folder (default promise-demo)")
    add_backbone_args(p)
    p.add_argument("--warmup", type=non_negative_int, default=40, help="APM warm-up epochs (box loss only; cheap)")
    p.add_argument("--epochs", type=positive_int, default=25, help="joint APM+IPS epochs after the warm-up")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_demo)
