"""Benchmark (not a test): the ProMISe ablation on an images+masks folder, one table.

    .venv/bin/python Testing/benchmarks/ablation.py ../shared/data/kvasir-seg [--sam-checkpoint vit_b]

Rows: vanilla SAM with one positive click at the image centre (what a user gets without an adapter),
vanilla SAM with 3+3 points sampled from the ground truth, APM only (automatic), IPS with the same
ground-truth points, APM+IPS (automatic). Adapters are trained on ``--train`` images of ``train/``,
the epoch is selected on ``--select`` other images of ``train/``, and every row is measured on the
untouched ``val/`` folder (full resolution, threshold 0.5). SAM is frozen throughout.
Defaults fit in under 30 minutes on 2 CPU cores with the embedded default backbone.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PromiseSegment"))
from PromiseSegmentLib.checkpoints import load_backbone  # noqa: E402
from PromiseSegmentLib.datasets import load_image_folder  # noqa: E402
from PromiseSegmentLib.evaluation import evaluate_cases, summary  # noqa: E402
from PromiseSegmentLib.promise import ProMISeModel, engine_for  # noqa: E402
from PromiseSegmentLib.training import TrainConfig, train_adapter  # noqa: E402

GT_POINTS = 3  # positive and negative points sampled from the truth (same as `evaluate --prompt gt-points`)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="folder with train/ and val/ (images/ + masks/ each)")
    ap.add_argument("--sam-checkpoint", help="vit_b|vit_l|vit_h|medsam or a path; default: embedded backbone")
    ap.add_argument("--train", type=int, default=160, help="training images (first N of train/)")
    ap.add_argument("--select", type=int, default=40, help="model-selection images (last N of train/)")
    ap.add_argument("--test", type=int, help="limit val/ images (default: all)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--apm-width", type=int, default=64)
    ap.add_argument("--apm-blocks", default="1,1,1,1")
    ap.add_argument("--device")
    args = ap.parse_args()

    torch.manual_seed(0)
    pool = load_image_folder(args.data, "train")
    if args.train + args.select > len(pool):
        sys.exit(f"train/ has {len(pool)} images; --train + --select must not exceed that")
    train, select = pool[:args.train], pool[len(pool) - args.select:]
    test = load_image_folder(args.data, "val", args.test)
    sam, variant, identity = load_backbone(args.sam_checkpoint)
    print(f"backbone {variant} ({identity[:24]}), train {len(train)}, select {len(select)}, test {len(test)}, "
          f"device {engine_for(sam, variant, None, args.device).device}", flush=True)

    rows = []

    def measure(name, adapter, mode, prompt, params, seconds):
        model = ProMISeModel(engine_for(sam, variant, adapter, args.device), variant, identity, adapter)
        t = time.time()
        s = summary(evaluate_cases(model, test, mode=mode, prompt=prompt))
        rows.append((name, s["dice_mean"], s["iou_mean"], params, seconds, (time.time() - t) / len(test)))
        print(f"  {name}: Dice {s['dice_mean']:.3f}", flush=True)

    measure("vanilla SAM, 1 click at the image centre", None, "vanilla", "center", 0, 0.0)
    measure(f"vanilla SAM, {GT_POINTS}+{GT_POINTS} ground-truth points", None, "vanilla", "gt-points", 0, 0.0)
    blocks = tuple(int(b) for b in args.apm_blocks.split(","))
    for name, kw, mode, prompt in (
            ("APM only (automatic)", dict(use_ips=False), "apm+ips", "none"),
            (f"IPS + {GT_POINTS}+{GT_POINTS} ground-truth points", dict(use_apm=False, gt_points=GT_POINTS), "ips",
             "gt-points"),
            ("APM + IPS (automatic)", {}, "apm+ips", "none")):
        cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, augment=False,
                          cache_features=True, apm_fusion_dim=args.apm_width, apm_head_blocks=blocks, **kw)
        engine = engine_for(sam, variant, None, args.device)
        result = train_adapter(engine, variant, identity, train, select, cfg)
        print(f"  trained {name}: selection Dice per epoch "
              f"{[round(h['val_dice'], 3) for h in result.history]}, {result.seconds:.0f} s", flush=True)
        measure(name, result.adapter, mode, prompt, result.adapter.trainable_parameters(), result.seconds)

    print(f"\n| configuration ({variant}) | Dice | IoU | trainable parameters | training time | "
          "inference per image |")
    print("|---|---|---|---|---|---|")
    for name, d, iou, params, secs, per in rows:
        print(f"| {name} | {d:.3f} | {iou:.3f} | {params:,} | {secs:.0f} s | {per:.2f} s |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
