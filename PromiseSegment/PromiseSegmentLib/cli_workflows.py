"""``promise-segment`` commands that run the ProMISe workflows: demo, train, evaluate."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .progress import bar


def _train_progress(progress_bar):
    def report(epoch, total, row):
        progress_bar(epoch, total)
        progress_bar.postfix(loss=f"{row['loss']:.3f}", val_dice=f"{row['val_dice']:.3f}")
    return report


def cmd_demo(args) -> int:
    """Offline end to end on the generated sample volume: train an APM+IPS adapter on generated slices and
    segment the sample automatically (or, with ``--prompted``, plain SAM with a box + click per slice);
    write .seg.nrrd + overlay PNG + a Dice report against the known truth."""
    from .checkpoints import load_backbone
    from .cli import best_slice_overlay
    from .datasets import Case
    from .engine import Prompts
    from .metrics import dice
    from .preprocessing import mask_bbox
    from .promise import ProMISeModel, engine_for
    from .sample_data import make_sample_volume, make_training_slices
    from .training import TrainConfig, train_adapter
    from .volume_io import Segment, save_png, write_segmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    sam, variant, identity = load_backbone(args.sam_checkpoint, args.variant)
    if variant == "tiny":
        print("backbone: embedded default (tiny SAM architecture, seeded random weights - NOT SAM; "
              "pass --sam-checkpoint vit_b for real SAM)")
    vol, truth = make_sample_volume(0)
    if not args.prompted:
        engine = engine_for(sam, variant, None, args.device)
        pairs = make_training_slices(range(1, 1 + args.train_volumes))
        cases = [Case(f"train{i}", rgb, m) for i, (rgb, m) in enumerate(pairs)]
        val = cases[:: 6]
        train = [c for c in cases if c not in val]
        # light APM head and a high learning rate: minutes on a CPU (see the README's ablation table)
        cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=8, augment=False, cache_features=True,
                          apm_fusion_dim=64, apm_head_blocks=(1, 1, 1, 1), target_name="Lesion")
        with bar("training adapter", "epoch") as b:
            result = train_adapter(engine, variant, identity, train, val, cfg, out / "demo_adapter.safetensors",
                                   progress=_train_progress(b))
        model = ProMISeModel(engine_for(sam, variant, result.adapter, args.device), variant, identity,
                             result.adapter)
        how = (f"adapter APM+IPS trained on {len(train)} generated slices ({len(result.history)} epochs, "
               f"best validation Dice {result.best_val_dice:.3f}); automatic, no clicks")
        mode, prompts = "apm+ips", None
    else:
        model = ProMISeModel(engine_for(sam, variant, None, args.device), variant, identity)
        prompts = {k: Prompts(points=[np.argwhere(truth[k]).mean(0)[::-1]], labels=[1], box=mask_bbox(truth[k], 2))
                   for k in range(truth.shape[0]) if truth[k].any()}
        how = f"SAM prompted on {len(prompts)} slices with a box + centre click each (what a user would draw)"
        mode = "vanilla"
    with bar("segmenting", "slice") as b:
        mask = model.segment_volume(vol.array, vol.ijk_to_ras, mode=mode, prompts=prompts, progress=b)
    seg = write_segmentation(out / "sample.seg.nrrd", mask, vol.ijk_to_ras, [Segment("Lesion", (0.9, 0.3, 0.2))],
                             overwrite=True)
    write_segmentation(out / "sample_truth.seg.nrrd", truth, vol.ijk_to_ras, [Segment("Truth", (0.2, 0.9, 0.3))], overwrite=True)
    png = save_png(out / "sample_overlay.png", best_slice_overlay(vol.array, mask, 0, model.intensity, truth))
    d = dice(mask, truth)
    report = (f"PromiseSegment demo: {variant} backbone; {how}\n"
              f"sample volume {vol.array.shape[::-1]} voxels (I, J, K), spacing 0.9 x 0.9 x 3.0 mm, oblique\n"
              f"Dice vs the known truth (3D): {d:.3f}\n"
              f"time: {time.time() - start:.0f} s\n")
    (out / "report.txt").write_text(report)
    print(report + f"wrote {seg}, {png}, {out / 'report.txt'}")
    return 0


def cmd_train(args) -> int:
    from .checkpoints import load_backbone
    from .cli import intensity_from_args
    from .datasets import load_image_folder, load_volume_pairs
    from .promise import engine_for
    from .training import TrainConfig, train_adapter

    rule = intensity_from_args(args)
    if args.volumes:
        pairs = [p.split(",") for p in args.volumes]
        cases = load_volume_pairs(pairs, rule, args.axis, args.label, args.empty_share, args.seed)
        rng = np.random.default_rng(args.seed)
        idx = rng.permutation(len(cases))
        n_val = max(1, int(round(args.val_fraction * len(cases))))
        val, train = [cases[i] for i in idx[:n_val]], [cases[i] for i in idx[n_val:]]
    else:
        root = Path(args.data)
        if (root / "train").is_dir():
            train = load_image_folder(root, "train", args.limit)
            val = load_image_folder(root, "val", args.limit) if (root / "val").is_dir() else []
        else:
            cases = load_image_folder(root, None, args.limit)
            n_val = max(1, int(round(args.val_fraction * len(cases))))
            val, train = cases[:n_val], cases[n_val:]
    sam, variant, identity = load_backbone(args.sam_checkpoint, args.variant)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      augment=not args.no_augment, cache_features=args.cache_features,
                      use_apm=not args.no_apm, use_ips=not args.no_ips, n_points=args.points,
                      n_positive=args.positive, apm_fusion_dim=args.apm_width,
                      apm_head_blocks=tuple(int(v) for v in args.apm_blocks.split(",")),
                      target_name=args.name, intensity=rule.to_dict())
    engine = engine_for(sam, variant, None, args.device)
    print(f"training on {len(train)} cases, validating on {len(val)}; SAM {variant} frozen")
    with bar("training", "epoch") as b:
        result = train_adapter(engine, variant, identity, train, val, cfg, Path(args.output), args.resume,
                               progress=_train_progress(b))
    print(f"wrote {args.output}: best validation Dice {result.best_val_dice:.3f}, "
          f"{result.adapter.trainable_parameters():,} trainable parameters, {result.seconds:.0f} s")
    return 0


def cmd_evaluate(args) -> int:
    from .datasets import load_image_folder
    from .evaluation import evaluate_cases, write_report
    from .promise import load_model

    model = load_model(args.sam_checkpoint, args.adapter, args.variant, args.device,
                       allow_mismatch=args.allow_backbone_mismatch)
    cases = load_image_folder(args.data, args.split, args.limit)
    with bar("evaluating", "case") as b:
        rows = evaluate_cases(model, cases, mode=args.mode, prompt=args.prompt, progress=b)
    print(write_report(rows, cases, Path(args.out)))
    return 0


def add_workflow_commands(sub) -> None:
    from .cli import add_backbone_args, add_intensity_args

    p = sub.add_parser("demo", help="the whole ProMISe workflow offline on generated data (train, segment, report)")
    p.add_argument("--out", default="promise-demo", help="output folder (default promise-demo)")
    add_backbone_args(p)
    p.add_argument("--prompted", action="store_true",
                   help="skip training: plain SAM prompted with a box + centre click on every lesion slice")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-volumes", type=int, default=6, help="generated training volumes")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train an APM+IPS adapter on a frozen SAM")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder with images/ + masks/ (or train/ and val/ subfolders of those)")
    src.add_argument("--volumes", action="append", metavar="IMAGE,LABELMAP",
                     help="a 3D volume and its label map (NRRD/NIfTI); repeatable")
    p.add_argument("-o", "--output", required=True, help="adapter file to write (.safetensors)")
    add_backbone_args(p)
    add_intensity_args(p)
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--cache-features", action="store_true", help="encode once, keep fp16 features (needs --no-augment)")
    p.add_argument("--no-apm", action="store_true")
    p.add_argument("--no-ips", action="store_true")
    p.add_argument("--points", type=int, default=16, help="APM points N")
    p.add_argument("--positive", type=int, default=8, help="how many of the N slots are positive")
    p.add_argument("--apm-width", type=int, default=256, help="APM fusion width")
    p.add_argument("--apm-blocks", default="3,4,6,3", help="ResNet blocks per stage (3,4,6,3 = ResNet-34)")
    p.add_argument("--axis", default="K")
    p.add_argument("--label", type=int, help="label value in the label maps (default: any non-zero)")
    p.add_argument("--empty-share", type=float, default=0.1, help="empty slices per labelled slice")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--limit", type=int, help="use at most this many images per split")
    p.add_argument("--name", default="Segment", help="target structure name stored in the adapter")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT.state.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95 per case into a CSV, a summary and a PNG figure")
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="subfolder (e.g. val)")
    p.add_argument("--adapter")
    p.add_argument("--allow-backbone-mismatch", action="store_true")
    p.add_argument("--mode", default="auto", choices=["auto", "apm+ips", "ips", "apm+clicks", "vanilla"])
    p.add_argument("--prompt", choices=["none", "center", "gt-points"], default="none",
                   help="simulated user prompts: none, one positive click at the image centre, or 3+3 points "
                        "sampled from the ground truth (seeded per case)")
    p.add_argument("--limit", type=int)
    p.add_argument("--out", required=True, help="output folder for metrics.csv and figure.png")
    add_backbone_args(p)
    p.set_defaults(func=cmd_evaluate)

