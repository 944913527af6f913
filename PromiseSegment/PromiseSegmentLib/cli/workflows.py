"""``promise-segment`` commands that run the ProMISe workflows: demo, train, evaluate."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from PromiseSegmentLib.cli.arg_types import (
    any_int,
    apm_blocks_arg,
    apm_prompts_arg,
    axis_arg,
    name_arg,
    non_negative_float,
    non_negative_int,
    open_fraction,
    positive_float,
    positive_int,
    seed_arg,
    volume_pair_arg,
)
from PromiseSegmentLib.cli.arguments import (
    add_backbone_args,
    add_intensity_args,
    announce,
    engine_options,
    intensity_from_args,
    progress_bar,
)
from PromiseSegmentLib.cli.validation import preflight, train_values
from PromiseSegmentLib.names import DEFAULT_NAME
from PromiseSegmentLib.training.settings import LR_SCHEDULES, TRAIN_DEFAULTS


def _train_progress(progress):
    def report(epoch, total, row):
        progress.postfix(loss=f"{row['loss']:.3f}", val_dice=f"{row['val_dice']:.3f}")
        progress(epoch, total)
    return report


DEMO_TEST = ("10035_spleen_49", "10038_spleen_14", "10039_spleen_59")  # 3 patients never seen in training


def bundled_spleen() -> Path:
    """Real CT slices with expert spleen masks shipped with the package (MSD Task09, CC-BY-SA 4.0)."""
    return Path(__file__).resolve().parents[1] / "data" / "bundled" / "ct-spleen"


def cmd_demo(args) -> int:
    """The main job on real data, offline: train an APM+IPS adapter on bundled spleen CT slices of 12
    patients, segment the slices of 3 other patients automatically, write .seg.nrrd files, overlays at
    native resolution and a report with Dice against the expert masks."""
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.data.datasets import load_image_folder
    from PromiseSegmentLib.model.promise import ProMISeModel, engine_for
    from PromiseSegmentLib.paths import write_bytes_atomically
    from PromiseSegmentLib.training.trainer import TrainConfig, train_adapter

    out = Path(args.out)  # checked by validation._demo: a folder, empty unless --overwrite
    preflight(args.device)
    cfg = TrainConfig(epochs=args.warmup + args.epochs, apm_warmup_epochs=args.warmup, lr=args.lr, batch_size=4,
                      augment=False, cache_features=True, apm_fusion_dim=64, apm_tap_pool=2,
                      target_name="Spleen", intensity={"kind": "rgb"})
    cfg.check()
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    backbone = load_backbone(args.backbone)
    print(f"backbone: {backbone.spec.description}")
    cases = load_image_folder(bundled_spleen())
    test = [c for c in cases if c.id in DEMO_TEST]
    rest = [c for c in cases if c.id not in DEMO_TEST]
    fit, select = rest[:-3], rest[-3:]
    with progress_bar("training adapter", "epoch") as b:
        result = train_adapter(engine_for(backbone, None, args.device, **engine_options(args)), fit, select, cfg,
                               out / "spleen_adapter.safetensors", progress=_train_progress(b))
    model = ProMISeModel(engine_for(backbone, result.adapter, args.device, **engine_options(args)), result.adapter)
    announce(model.engine)
    lines, dices = _demo_segment(model, test, out)
    report = (f"PromiseSegment demo on real CT (bundled MSD spleen slices, CC-BY-SA 4.0)\n"
              f"backbone: {backbone.name} (frozen), weights SHA-256 {backbone.identity}\n"
              f"adapter: APM (box) + IPS trained on {len(fit)} slices of {len({c.id.split('_')[0] for c in fit})} "
              f"patients, selected on {len(select)} more "
              f"({len(result.history)} epochs, best selection Dice {result.best_val_dice:.3f}"
              f"{refinement_summary(result.adapter)})\n"
              f"automatic segmentation (no clicks) of 3 patients not used for training:\n" + "\n".join(lines) +
              f"\nmean Dice {np.mean(dices):.3f}\n"
              f"red: prediction, green: expert mask in the *_overlay.png files (native 512 x 512)\n"
              f"time: {time.time() - start:.0f} s\n")
    write_bytes_atomically(out / "report.txt", report.encode())
    print(report + f"wrote {out}/*.seg.nrrd, *_overlay.png, spleen_adapter.safetensors, report.txt")
    return 0


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
        write_segmentation(out / f"{case.id}.seg.nrrd", mask, vol.ijk_to_ras, [Segment("Spleen", model.target_color)],
                           overwrite=True)
        save_png(out / f"{case.id}_overlay.png", overlay_rgb(vol.array[0], [mask[0] > 0, case.mask]))
        lines.append(f"  {case.id}: Dice {d:.3f}  ({int(mask.sum())} voxels predicted, {int(case.mask.sum())} in the "
                     f"expert mask)")
        print(lines[-1])
    return lines, dices


def cmd_train(args) -> int:
    from PromiseSegmentLib.training.trainer import TrainConfig, read_resume_state

    rule = intensity_from_args(args)
    values = train_values(args)
    cfg = TrainConfig(**values, augment=not args.no_augment,
                      cache_features=args.cache_features, use_apm=not args.no_apm, use_ips=not args.no_ips,
                      target_name=args.name, intensity=rule.to_dict())
    cfg.check()
    preflight(args.device)
    output = Path(args.output)
    train, val = _training_cases(args, rule)
    if args.resume:  # a damaged state, other options or other data: refused before the backbone is loaded
        read_resume_state(Path(str(output) + ".state.pt"), cfg, (train, val))
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.model.promise import engine_for
    from PromiseSegmentLib.training.trainer import train_adapter

    backbone = load_backbone(args.backbone)
    engine = engine_for(backbone, None, args.device, **engine_options(args))
    announce(engine)
    print(f"training on {len(train)} cases, validating on {len(val)}; backbone {backbone.name} frozen", flush=True)
    with progress_bar("training", "epoch") as b:
        result = train_adapter(engine, train, val, cfg, output, args.resume, progress=_train_progress(b))
    print(f"wrote {args.output}: best validation Dice {result.best_val_dice:.3f}, "
          f"{result.adapter.trainable_parameters():,} trainable parameters, {result.seconds:.0f} s"
          + refinement_summary(result.adapter))
    return 0


def refinement_summary(adapter) -> str:
    """"; box refinement ..." as the trainer chose it on the validation images ("" without a box APM)."""
    tried = adapter.training.get("box_refinement_val_dice")
    if adapter.apm is None or not tried:
        return ""
    chosen = (adapter.apm.box_refinement, adapter.apm.refinement_margin)
    dice = {(t["steps"], t["margin"]): t["val_dice"] for t in tried}
    what = f"{chosen[0]} step(s), margin {chosen[1]:g}" if chosen[0] else "none"
    return (f"; box refinement: {what} (validation Dice {dice.get(chosen, float('nan')):.3f}, "
            f"without {dice.get((0, 0.0), float('nan')):.3f})")


def _training_cases(args, rule):
    """(train, validation) cases from --volumes or --data, refused when nothing can be learnt from them."""
    from PromiseSegmentLib.data.datasets import load_image_folder, load_volume_pairs
    from PromiseSegmentLib.training.trainer import check_training_cases

    if args.volumes:
        cases = load_volume_pairs(args.volumes, rule, args.axis, args.label, args.empty_share, args.seed)
        idx = np.random.default_rng(args.seed).permutation(len(cases))
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
    check_training_cases(train, val)
    return train, val


def cmd_evaluate(args) -> int:
    from PromiseSegmentLib.data.datasets import load_image_folder
    from PromiseSegmentLib.evaluation.report import evaluate_cases, write_report

    prompt_kind = {"center": "points", "gt-points": "points", "gt-box": "box"}.get(args.prompt)
    preflight(args.device, args.mode, args.adapter_meta, args.backbone, prompt_kind == "points",
              prompt_kind == "box")
    cases = load_image_folder(args.data, args.split, args.limit)
    from PromiseSegmentLib.model.promise import load_model

    model = load_model(args.backbone, args.adapter, args.device, allow_mismatch=args.allow_backbone_mismatch,
                       **engine_options(args))
    announce(model.engine)
    with progress_bar("evaluating", "case") as b:
        rows = evaluate_cases(model, cases, mode=args.mode, prompt=args.prompt, progress=b)
    print(write_report(rows, cases, Path(args.out), overwrite=args.overwrite))
    return 0


def add_workflow_commands(sub) -> None:

    p = sub.add_parser("demo", help="the whole ProMISe workflow offline on bundled real CT (train, segment, report)")
    p.add_argument("--out", default="promise-demo", help="output folder (default promise-demo)")
    add_backbone_args(p)
    p.add_argument("--warmup", type=non_negative_int, default=40, help="APM warm-up epochs (box loss only; cheap)")
    p.add_argument("--epochs", type=positive_int, default=25, help="joint APM+IPS epochs after the warm-up")
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    p.set_defaults(func=cmd_demo)
    _add_train_command(sub)
    _add_evaluate_command(sub)


def _add_train_command(sub) -> None:

    d = TRAIN_DEFAULTS
    p = sub.add_parser("train", help="train an APM+IPS adapter on a frozen backbone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder with images/ + masks/ (or train/ and val/ subfolders of those)")
    src.add_argument("--volumes", action="append", type=volume_pair_arg, metavar="IMAGE,LABELMAP",
                     help="a 3D volume and its label map (NRRD/NIfTI); repeatable")
    p.add_argument("-o", "--output", required=True, help="adapter file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing adapter (and the state of an interrupted run) instead of refusing")
    add_backbone_args(p)
    add_intensity_args(p)
    p.add_argument("--epochs", type=positive_int, default=d["epochs"])
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    p.add_argument("--lr", type=positive_float, default=d["lr"])
    p.add_argument("--seed", type=seed_arg, default=d["seed"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--cache-features", action="store_true", help="encode once, keep fp16 features (needs --no-augment)")
    p.add_argument("--augmented-copies", type=non_negative_int, default=d["augmented_copies"], metavar="K",
                   help="with --cache-features: also K augmented versions of each image, each encoded once "
                        "(augmentation for K extra encodes per image)")
    p.add_argument("--no-apm", action="store_true")
    p.add_argument("--no-ips", action="store_true")
    p.add_argument("--apm-prompts", type=apm_prompts_arg,
                   help="what the APM predicts: box, points or box,points (default: the backbone's; box for "
                        "lite_medsam, points for SAM ViT)")
    _add_apm_options(p, d)
    p.add_argument("--user-prompt", choices=("none", "box", "points"), default=d["user_prompt"],
                   help="train IPS alone with prompts from the ground truth (what a user would give)")
    p.add_argument("--axis", default="K", type=axis_arg, help="slicing axis of --volumes (default K)")
    p.add_argument("--label", type=any_int, help="label value in the label maps (default: any non-zero)")
    p.add_argument("--empty-share", type=non_negative_float, default=0.1, help="empty slices per labelled slice")
    p.add_argument("--val-fraction", type=open_fraction, default=0.15)
    p.add_argument("--limit", type=positive_int, help="use at most this many images per split")
    p.add_argument("--name", type=name_arg, default=DEFAULT_NAME, help="target structure name stored in the adapter")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in OUTPUT.state.pt (same options; --epochs may grow)")
    p.set_defaults(func=cmd_train)


def _add_apm_options(p, d) -> None:
    p.add_argument("--points", type=positive_int, default=d["n_points"], help="APM points N")
    p.add_argument("--positive", type=non_negative_int, default=d["n_positive"],
                   help="how many of the N slots are positive (at most --points)")
    p.add_argument("--apm-width", type=positive_int, default=d["apm_fusion_dim"], help="APM fusion width")
    p.add_argument("--apm-blocks", type=apm_blocks_arg, default=d["apm_head_blocks"],
                   help="ResNet blocks per stage of the point head (3,4,6,3 = ResNet-34)")
    p.add_argument("--apm-tap-pool", type=positive_int, default=d["apm_tap_pool"],
                   help="average-pool the encoder taps by this")
    p.add_argument("--box-loss-weight", type=non_negative_float, default=d["box_loss_weight"],
                   help="auxiliary APM loss against the mask's bounding box (0: the paper's mask loss only)")
    p.add_argument("--apm-warmup", type=non_negative_int, default=d["apm_warmup_epochs"],
                   help="epochs training the APM alone on the auxiliary loss before the joint phase")
    p.add_argument("--apm-joint-lr", type=non_negative_float, default=d["apm_joint_lr"],
                   help="the APM's learning rate after the warm-up, as a share of --lr (0: keep it as warmed up)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d["lr_schedule"],
                   help="cosine: the learning rate decays towards 0 within the warm-up and within the joint phase")


def _add_evaluate_command(sub) -> None:
    from PromiseSegmentLib.names import MODES

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95 per case into a CSV, a summary and a PNG figure")
    p.add_argument("--data", required=True)
    p.add_argument("--split", help="subfolder (e.g. val)")
    p.add_argument("--adapter")
    p.add_argument("--allow-backbone-mismatch", action="store_true")
    p.add_argument("--mode", default="auto", choices=MODES)
    p.add_argument("--prompt", choices=["none", "center", "gt-points", "gt-box"], default="none",
                   help="simulated user prompts: none, one positive click at the image centre, 3+3 points "
                        "sampled from the ground truth (seeded per case), or the ground truth's bounding box")
    p.add_argument("--limit", type=positive_int)
    p.add_argument("--out", required=True, help="output folder for metrics.csv and figure.png")
    p.add_argument("--overwrite", action="store_true", help="replace metrics.csv and figure.png in --out")
    add_backbone_args(p)
    p.set_defaults(func=cmd_evaluate)
