"""Benchmark (not a test): ProMISe accuracy on real images with expert masks, one table per data set.

    .venv/bin/python Testing/benchmarks/accuracy.py ../shared/data --sets kvasir [--configs ...]

Rows (``--configs``): the frozen backbone with the ground-truth box (its native prompt) and with one
click at the image centre; an APM-only adapter; IPS trained and tested with the ground-truth box; APM+IPS
automatic (no user input), with and without the auxiliary box loss. Adapters are fitted on the
training split, the epoch is selected on a held-out part of it, and every row is measured on the test
split at full resolution. Each image is encoded once (features cached on disk under ``--cache``), so an
epoch costs only APM + IPS + decoder.

Splits: kvasir = kvasir-seg train/ (last 10 % for selection) -> val/ (101); ph2 = sorted ids 0-59 fit,
60-69 select, 70-99 test; ct-spleen = 10 fit, 2 select, 6 test. ``mr`` (3D, per-volume Dice): the three
pyradiomics MR volumes, leave-one-volume-out (adapters trained on the slices of the two others, half as
many empty slices as labelled ones; selection on those training slices - there is nothing else), rows:
the backbone with the label's 3D bounding box (middle slice, then middle-out with the previous result's
box + 3 px, LiteMedSAM's reference 3D inference), IPS with the same box, APM+IPS automatic on every slice.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PromiseSegment"))
from PromiseSegmentLib.backbones.registry import load_backbone  # noqa: E402
from PromiseSegmentLib.data.datasets import load_image_folder  # noqa: E402
from PromiseSegmentLib.data.prompts import (
    Prompts,
    mask_box,  # noqa: E402
)
from PromiseSegmentLib.evaluation.metrics import dice, iou  # noqa: E402
from PromiseSegmentLib.inference.engine import (
    ImageEmbedding,
    mask_to_low_res,  # noqa: E402
)
from PromiseSegmentLib.model.promise import ProMISeModel, engine_for  # noqa: E402
from PromiseSegmentLib.training.batches import Encoded, input_box  # noqa: E402
from PromiseSegmentLib.training.config import TrainConfig  # noqa: E402
from PromiseSegmentLib.training.trainer import Trainer  # noqa: E402

LIGHT = dict(apm_fusion_dim=128, apm_tap_pool=2, lr=1e-3, batch_size=8, augment=False, cache_features=True)
CONFIGS = {
    "vanilla+gt-box": None,
    "vanilla+centre-click": None,
    "apm-only": dict(use_ips=False),
    "ips+gt-box": dict(use_apm=False, user_prompt="box"),
    "apm+ips": dict(),
    "apm+ips-mask-loss-only": dict(box_loss_weight=0.0, apm_warmup_epochs=0),
    "apm+ips-frozen-apm": dict(apm_joint_lr=0.0),  # the warmed-up APM kept as it is; the joint phase trains IPS
    "apm+ips-frozen-apm-cosine": dict(apm_joint_lr=0.0, lr_schedule="cosine"),  # and lr annealed in each phase
    "apm+ips-frozen-apm-aug2": dict(apm_joint_lr=0.0, augmented_copies=2),  # + 2 augmented versions of each image
    "apm+ips-frozen-apm-aug4": dict(apm_joint_lr=0.0, augmented_copies=4),
    "apm+ips-full-taps": dict(apm_joint_lr=0.0, lr_schedule="cosine", apm_tap_pool=1),  # 64x64 taps, 4x the APM cost
    "apm+ips-box+points": dict(apm_prompts=("box", "points"), apm_head_blocks=(1, 1, 1, 1)),
    "apm+ips-paper-points-head": dict(
        apm_prompts=("points",),
        apm_fusion_dim=256,
        apm_head_blocks=(3, 4, 6, 3),
        box_loss_weight=0.0,
        apm_warmup_epochs=0,
        apm_tap_pool=1,
    ),
}


def splits(root: Path, name: str):
    if name == "kvasir":
        train = load_image_folder(root / "kvasir-seg", "train")
        n_sel = len(train) // 10
        return train[:-n_sel], train[-n_sel:], load_image_folder(root / "kvasir-seg", "val")
    if name == "ph2":
        cases = load_image_folder(root / "ph2")
        return cases[:60], cases[60:70], cases[70:]
    if name == "ct-spleen":
        cases = load_image_folder(root / "ct-spleen-slices")
        return cases[:10], cases[10:12], cases[12:]
    raise SystemExit(f"unknown set {name}")


def encode_all(engine, cases, path: Path):
    """Encoder outputs (fp16) for every case, computed once and kept on disk."""
    if path.exists():
        return torch.load(path, weights_only=True)
    out, start = [], time.time()
    for n, case in enumerate(cases):
        emb = engine.encode([case.rgb])[0]
        out.append(
            {
                "features": emb.features.half(),
                "taps": [t.half() for t in emb.taps],
                "input_size": list(emb.input_size),
                "original_size": list(emb.original_size),
            }
        )
        if n % 50 == 0:
            print(f"  encoded {n + 1}/{len(cases)} ({time.time() - start:.0f} s)", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def as_embedding(e) -> ImageEmbedding:
    return ImageEmbedding(
        e["features"].float(), tuple(e["input_size"]), tuple(e["original_size"]), [t.float() for t in e["taps"]]
    )


def encoded_items(trainer, encs, cases, spec):
    items = []
    for e, case in zip(encs, cases):
        taps = trainer.adapter.apm.prepare_taps([t.float() for t in e["taps"]]) if trainer.adapter.apm else []
        items.append(
            Encoded(
                e["features"],
                [t.half() for t in taps],
                mask_to_low_res(case.mask, tuple(e["input_size"]), spec.image_size)[0] > 0.5,
                input_box(case.mask, spec, tuple(e["original_size"])),
                case.mask,
                tuple(e["input_size"]),
                tuple(e["original_size"]),
            )
        )
    return items


def evaluate(model, encs, cases, mode, prompt):
    dices, ious, box_ious, seconds = [], [], [], []
    for e, case in zip(encs, cases):
        p = Prompts()
        if prompt == "box":
            p = Prompts(box=mask_box(case.mask))
        elif prompt == "centre":
            h, w = case.mask.shape
            p = Prompts(points=[[w / 2, h / 2]], labels=[1])
        t = time.time()
        if mode == "vanilla":  # the raw backbone, even where it refuses such prompts (LiteMedSAM: points)
            from PromiseSegmentLib.inference.volume_loop import vanilla_predict

            emb = as_embedding(e)
            pred = vanilla_predict(model.engine, emb, p, emb.original_size)
        else:
            pred = model.predict(as_embedding(e), p, mode=mode)
        seconds.append(time.time() - t)
        dices.append(dice(pred.masks[0], case.mask))
        ious.append(iou(pred.masks[0], case.mask))
        gt = mask_box(case.mask)
        if pred.box is not None and gt is not None and mode == "apm+ips":
            a, b = pred.box, np.array([gt[0], gt[1], gt[2] + 1, gt[3] + 1])
            inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            box_ious.append(inter / max(union, 1e-6))
    return dices, ious, box_ious, float(np.mean(seconds))


def mr_rows(args, backbone):
    from PromiseSegmentLib.data.datasets import volume_cases
    from PromiseSegmentLib.data.preprocessing import IntensityRule
    from PromiseSegmentLib.data.prompts import ijk_prompts
    from PromiseSegmentLib.data.volume_io import read_labelmap, read_volume

    names = ("brain1", "brain2", "breast1")
    vols = {
        n: (
            read_volume(args.data / "mr-volumes" / f"{n}_image.nrrd"),
            read_labelmap(args.data / "mr-volumes" / f"{n}_label.nrrd").array > 0,
        )
        for n in names
    }
    rule = IntensityRule()
    cases = {n: volume_cases(n, v.array, lab, v.ijk_to_ras, rule, "K", empty_share=0.5) for n, (v, lab) in vols.items()}
    results = {
        "vanilla + box on each slice (2D)": [],
        "vanilla + 3D box": [],
        "IPS + 3D box": [],
        "APM+IPS automatic": [],
    }
    for test in names:
        vol, truth = vols[test]
        train = [c for n in names if n != test for c in cases[n]]
        k = np.nonzero(truth.any(axis=(1, 2)))[0]
        j, i = np.nonzero(truth.any(axis=0))
        box = ijk_prompts(0, [], [[i.min(), j.min(), k.min(), i.max(), j.max(), k.max()]], truth.shape)
        plain = ProMISeModel(engine_for(backbone, None, "cpu"))
        per_slice = {int(s): Prompts(box=mask_box(truth[s])) for s in k}
        results["vanilla + box on each slice (2D)"].append(
            dice(plain.segment_volume(vol.array, vol.ijk_to_ras, prompts=per_slice, box_propagation=False) > 0, truth)
        )
        plain_mask = plain.segment_volume(vol.array, vol.ijk_to_ras, prompts=box) > 0
        results["vanilla + 3D box"].append(dice(plain_mask, truth))
        for row, extra, mode, prompts in (
            ("IPS + 3D box", dict(use_apm=False, user_prompt="box"), "ips", box),
            ("APM+IPS automatic", dict(), "apm+ips", None),
        ):
            warmup = args.warmup if extra.get("use_apm", True) else 0
            cfg = TrainConfig(
                **{**LIGHT, **extra, "apm_warmup_epochs": warmup, "epochs": warmup + args.epochs, "batch_size": 4}
            )
            from PromiseSegmentLib.training.trainer import train_adapter

            result = train_adapter(engine_for(backbone, None, "cpu"), train, train, cfg)
            model = ProMISeModel(engine_for(backbone, result.adapter, "cpu"), result.adapter)
            mask = model.segment_volume(vol.array, vol.ijk_to_ras, mode=mode, prompts=prompts)
            results[row].append(dice(mask > 0, truth))
        print(f"  {test}: " + ", ".join(f"{r} {v[-1]:.3f}" for r, v in results.items()), flush=True)
    print(f"\n| mr, per-volume Dice ({backbone.name}, leave one volume out) | " + " | ".join(names) + " | mean |")
    print("|---|" + "---|" * (len(names) + 1))
    for row, values in results.items():
        print(f"| {row} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {np.mean(values):.3f} |", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="the shared data folder (kvasir-seg/, ph2/, ct-spleen-slices/)")
    ap.add_argument("--sets", default="kvasir", help="comma-separated: kvasir, ph2, ct-spleen, mr")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated rows, from: " + ", ".join(CONFIGS))
    ap.add_argument("--backbone", default="lite_medsam")
    ap.add_argument("--epochs", type=int, default=10, help="joint epochs (after the APM warm-up)")
    ap.add_argument("--warmup", type=int, default=15, help="APM warm-up epochs on the auxiliary loss")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/promise-features"))
    ap.add_argument("--save-adapters", type=Path, help="folder to keep the trained adapters in")
    args = ap.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone)
    engine = engine_for(backbone, None, "cpu")
    engine.capture_taps = True
    for name in args.sets.split(","):
        if name == "mr":
            mr_rows(args, backbone)
            continue
        fit, select, test = splits(args.data, name)
        print(
            f"\n## {name}: {len(fit)} fit, {len(select)} select, {len(test)} test; backbone {backbone.name}", flush=True
        )
        enc = {
            k: encode_all(engine, cs, args.cache / f"{backbone.name}_{name}_{k}.pt")
            for k, cs in (("fit", fit), ("select", select), ("test", test))
        }
        rows = []
        for config in args.configs.split(","):
            overrides = CONFIGS[config]
            model, trained, params, per_epoch = ProMISeModel(engine_for(backbone, None, "cpu")), 0.0, 0, float("nan")
            mode, prompt = "vanilla", ("box" if "box" in config else "centre")
            if overrides is not None:
                warmup = overrides.get("apm_warmup_epochs", args.warmup if overrides.get("use_apm", True) else 0)
                cfg = TrainConfig(**{**LIGHT, **overrides, "apm_warmup_epochs": warmup, "epochs": warmup + args.epochs})
                trainer = Trainer(engine_for(backbone, None, "cpu"), fit, select, cfg, None)
                trainer.train_src.cache = dict(enumerate(encoded_items(trainer, enc["fit"], fit, backbone.spec)))
                trainer.val_src.cache = dict(enumerate(encoded_items(trainer, enc["select"], select, backbone.spec)))
                t = time.time()
                result = trainer.run(False, lambda s: s.record and print(f"  {config} {s.record}", flush=True), None)
                trained, params = time.time() - t, result.adapter.trainable_parameters()
                per_epoch = float(np.mean([h.seconds for h in result.history if h.phase == "joint"]))
                model = ProMISeModel(engine_for(backbone, result.adapter, "cpu"), result.adapter)
                mode, prompt = ("ips", "box") if cfg.user_prompt == "box" else ("apm+ips", "none")
                if args.save_adapters:
                    from PromiseSegmentLib.model.adapter import save_adapter

                    args.save_adapters.mkdir(parents=True, exist_ok=True)
                    save_adapter(result.adapter, args.save_adapters / f"{name}_{config}.safetensors")
            d, j, b, sec = evaluate(model, enc["test"], test, mode, prompt)
            rows.append(
                (
                    config,
                    np.mean(d),
                    np.median(d),
                    np.mean(j),
                    np.mean(b) if b else float("nan"),
                    params,
                    trained,
                    per_epoch,
                    sec,
                )
            )
            print(f"  -> {config}: Dice {np.mean(d):.3f} (median {np.median(d):.3f})", flush=True)
        print(
            f"\n| {name} ({backbone.name}) | Dice | median | IoU | APM box IoU | trainable parameters | "
            f"training s | s/epoch (joint) | decode s/image |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r[0]} | {r[1]:.3f} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:,} | {r[6]:.0f} | "
                f"{r[7]:.1f} | {r[8]:.3f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
