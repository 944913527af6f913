"""The ``train`` command: an APM/IPS adapter from image folders or labelled volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from PromiseSegmentLib.cli.arg_types import (
    any_int,
    apm_prompts_arg,
    axis_arg,
    head_blocks_arg,
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
    progress_bar,
)
from PromiseSegmentLib.cli.validation import preflight, train_config
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.names import DEFAULT_NAME
from PromiseSegmentLib.training.config import LR_SCHEDULES, TRAIN_DEFAULTS


def train_progress(progress):
    def report(epoch, total, row):
        progress.postfix(loss=f"{row['loss']:.3f}", val_dice=f"{row['val_dice']:.3f}")
        progress(epoch, total)

    return report


def cmd_train(args) -> int:
    from PromiseSegmentLib.training.resume import read_resume_state

    cfg = train_config(args)
    cfg.check()
    rule = IntensityRule.from_dict(cfg.intensity)
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
        result = train_adapter(engine, train, val, cfg, output, args.resume, progress=train_progress(b))
    print(
        f"wrote {args.output}: best validation Dice {result.best_val_dice:.3f}, "
        f"{result.adapter.trainable_parameters():,} trainable parameters, {result.seconds:.0f} s"
        + refinement_summary(result.adapter)
    )
    return 0


def refinement_summary(adapter) -> str:
    """ "; box refinement ..." as the trainer chose it on the validation images ("" without a box APM)."""
    tried = adapter.training.get("box_refinement_val_dice")
    if adapter.apm is None or not tried:
        return ""
    chosen = (adapter.apm.box_refinement, adapter.apm.refinement_margin)
    dice = {(t["steps"], t["margin"]): t["val_dice"] for t in tried}
    what = f"{chosen[0]} step(s), margin {chosen[1]:g}" if chosen[0] else "none"
    return (
        f"; box refinement: {what} (validation Dice {dice.get(chosen, float('nan')):.3f}, "
        f"without {dice.get((0, 0.0), float('nan')):.3f})"
    )


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


def add_train_command(sub) -> None:

    d = TRAIN_DEFAULTS
    p = sub.add_parser("train", help="train an APM+IPS adapter on a frozen backbone")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder with images/ + masks/ (or train/ and val/ subfolders of those)")
    src.add_argument(
        "--volumes",
        action="append",
        type=volume_pair_arg,
        metavar="IMAGE,LABELMAP",
        help="a 3D volume and its label map (NRRD/NIfTI); repeatable",
    )
    p.add_argument("-o", "--output", required=True, help="adapter file to write (.safetensors)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing adapter (and the state of an interrupted run) instead of refusing",
    )
    add_backbone_args(p)
    add_intensity_args(p)
    p.add_argument("--epochs", type=positive_int, default=d["epochs"])
    p.add_argument("--batch-size", type=positive_int, default=d["batch_size"])
    p.add_argument("--lr", type=positive_float, default=d["lr"])
    p.add_argument("--seed", type=seed_arg, default=d["seed"])
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--cache-features", action="store_true", help="encode once, keep fp16 features (needs --no-augment)")
    p.add_argument(
        "--augmented-copies",
        type=non_negative_int,
        default=d["augmented_copies"],
        metavar="K",
        help="with --cache-features: also K augmented versions of each image, each encoded once "
        "(augmentation for K extra encodes per image)",
    )
    p.add_argument("--no-apm", action="store_true")
    p.add_argument("--no-ips", action="store_true")
    p.add_argument(
        "--apm-prompts",
        type=apm_prompts_arg,
        help="what the APM predicts: box, points or box,points (default: the backbone's; box for "
        "lite_medsam, points for SAM ViT)",
    )
    _add_apm_options(p, d)
    p.add_argument(
        "--user-prompt",
        choices=("none", "box", "points"),
        default=d["user_prompt"],
        help="train IPS alone with prompts from the ground truth (what a user would give)",
    )
    p.add_argument("--axis", default="K", type=axis_arg, help="slicing axis of --volumes (default K)")
    p.add_argument("--label", type=any_int, help="label value in the label maps (default: any non-zero)")
    p.add_argument("--empty-share", type=non_negative_float, default=0.1, help="empty slices per labelled slice")
    p.add_argument("--val-fraction", type=open_fraction, default=0.15)
    p.add_argument("--limit", type=positive_int, help="use at most this many images per split")
    p.add_argument("--name", type=name_arg, default=DEFAULT_NAME, help="target structure name stored in the adapter")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in OUTPUT.state.pt (same options; --epochs may grow)",
    )
    p.set_defaults(func=cmd_train)


def _add_apm_options(p, d) -> None:
    p.add_argument("--points", type=positive_int, default=d["n_points"], help="APM points N")
    p.add_argument(
        "--positive",
        type=non_negative_int,
        default=d["n_positive"],
        help="how many of the N slots are positive (at most --points)",
    )
    p.add_argument("--apm-width", type=positive_int, default=d["apm_fusion_dim"], help="APM fusion width")
    p.add_argument(
        "--apm-blocks",
        type=head_blocks_arg,
        default=d["apm_head_blocks"],
        help="ResNet blocks per stage of the point head (3,4,6,3 = ResNet-34)",
    )
    p.add_argument(
        "--apm-tap-pool", type=positive_int, default=d["apm_tap_pool"], help="average-pool the encoder taps by this"
    )
    p.add_argument(
        "--box-loss-weight",
        type=non_negative_float,
        default=d["box_loss_weight"],
        help="auxiliary APM loss against the mask's bounding box (0: the paper's mask loss only)",
    )
    p.add_argument(
        "--apm-warmup",
        type=non_negative_int,
        default=d["apm_warmup_epochs"],
        help="epochs training the APM alone on the auxiliary loss before the joint phase",
    )
    p.add_argument(
        "--apm-joint-lr",
        type=non_negative_float,
        default=d["apm_joint_lr"],
        help="the APM's learning rate after the warm-up, as a share of --lr (0: keep it as warmed up)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=d["lr_schedule"],
        help="cosine: the learning rate decays towards 0 within the warm-up and within the joint phase",
    )
