"""The ``train`` command: an APM/IPS adapter from image folders or labelled volumes.

With no training options it runs the ``auto`` recipe for the data size (``training.recipe``); every option
given replaces the recipe's value. The plan and its time estimate on this machine are printed before any
work; progress follows per encoded image and per batch, with the phase named.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

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
from PromiseSegmentLib.training.config import LR_SCHEDULES
from PromiseSegmentLib.training.recipe import RECIPES, SMALL_SET, recipe_config, split_for_selection

_AUTO = recipe_config("auto", SMALL_SET)  # the auto recipe on a large data set: the values the help texts name


class PhaseProgress:
    """Training progress for the terminal or logs: one bar (or line series) per phase, with the last epoch's
    loss and selection Dice."""

    UNITS = {"encode": "image", "apm warm-up": "batch", "joint": "batch"}

    def __init__(self):
        self.phase: Optional[str] = None
        self.bar = None

    def __call__(self, status) -> None:
        if status.phase != self.phase:
            self.close()
            self.phase = status.phase
            label = "encoding images" if status.phase == "encode" else f"training ({status.phase})"
            self.bar = progress_bar(label, self.UNITS.get(status.phase, "step")).__enter__()
        if status.record is not None:
            r = status.record
            shown = {"epoch": f"{r.epoch + 1}/{status.epochs}", "loss": f"{r.loss:.3f}"}
            if r.val_dice == r.val_dice:  # not NaN: a scored epoch
                shown["selection_dice"] = f"{r.val_dice:.3f}"
            self.bar.postfix(**shown)
        else:
            self.bar(status.done, status.total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def cmd_train(args) -> int:
    from PromiseSegmentLib.cli.validation import train_overrides
    from PromiseSegmentLib.training.recipe import RunOptions
    from PromiseSegmentLib.training.resume import read_resume_state

    started = time.monotonic()  # the time budget counts from here: loading the data is part of the run
    rule = intensity_rule(args)
    preflight(args.device)
    output = Path(args.output)
    train, select = _training_cases(args, rule)
    resumed = None
    if args.resume:  # a damaged state, other options or other data: refused before the backbone is loaded
        resumed = _resumed_config(read_resume_state(Path(str(output) + ".state.pt"), None, (train, select)), args)
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.model.promise import engine_for
    from PromiseSegmentLib.training.run import run_training

    engine = engine_for(load_backbone(args.backbone), None, args.device, **engine_options(args))
    announce(engine)
    options = RunOptions(args.recipe, train_overrides(args), args.time_budget, args.val_fraction, args.feature_cache)
    bars = PhaseProgress()
    try:
        result = run_training(
            engine,
            train,
            select,
            options,
            output,
            args.resume,
            bars,
            None,
            lambda text: print(text, flush=True),
            resumed,
            started,
        )
    finally:
        bars.close()
    print(_summary(args.output, result))
    return 0


def intensity_rule(args) -> IntensityRule:
    return IntensityRule.from_dict(train_config(args, 100).intensity)


def _resumed_config(state: Dict[str, Any], args):
    """The interrupted run's own configuration (its recipe and time-budget scaling included); an option the
    user gives now must agree with it, except ``--epochs``, which may grow."""
    from dataclasses import replace

    from PromiseSegmentLib.cli.validation import train_overrides
    from PromiseSegmentLib.errors import InputError
    from PromiseSegmentLib.training.config import OPTION_NAMES, TrainConfig

    stored = replace(TrainConfig(), **_plain_to_fields(state["config"]), epochs=state["planned_epochs"])
    given = train_overrides(args)
    differ = [
        f"{OPTION_NAMES.get(k, k)} {_plain(getattr(stored, k))!r} then, {_plain(v)!r} now"
        for k, v in given.items()
        if k != "epochs" and _plain(getattr(stored, k)) != _plain(v)
    ]
    if differ:
        raise InputError(
            f"{args.output}.state.pt was written with other options ({'; '.join(differ)}): resume "
            f"with the same options, or start again with --overwrite"
        )
    return replace(stored, epochs=given.get("epochs", stored.epochs))


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _plain_to_fields(config: Dict[str, Any]) -> Dict[str, Any]:
    tuples = ("apm_head_blocks", "target_color")
    return {k: (tuple(v) if k in tuples and isinstance(v, list) else v) for k, v in config.items()}


def _summary(output: str, result) -> str:
    t = result.adapter.training
    box = ""
    if "val_box_dice" in t:
        box = f"; with the ground-truth box {t['val_box_dice']:.3f} (frozen backbone {t['val_frozen_box_dice']:.3f}"
        box += (
            ": your own boxes go through IPS)"
            if t.get("ips_for_user_box")
            else ": your own boxes use the frozen decoder)"
        )
    return (
        f"wrote {output}: selection Dice {result.best_val_dice:.3f} automatic{box}, "
        f"{result.adapter.trainable_parameters():,} trainable parameters, {result.seconds:.0f} s"
        + refinement_summary(result.adapter)
    )


def refinement_summary(adapter) -> str:
    """ "; box refinement ..." as the trainer chose it on the selection images ("" without a box APM)."""
    tried = adapter.training.get("box_refinement_val_dice")
    if adapter.apm is None or not tried:
        return ""
    chosen = (adapter.apm.box_refinement, adapter.apm.refinement_margin)
    dice = {(t["steps"], t["margin"]): t["val_dice"] for t in tried}
    what = f"{chosen[0]} step(s), margin {chosen[1]:g}" if chosen[0] else "none"
    return (
        f"; box refinement: {what} (selection Dice {dice.get(chosen, float('nan')):.3f}, "
        f"without {dice.get((0, 0.0), float('nan')):.3f})"
    )


def _training_cases(args, rule) -> Tuple[List, List]:
    """(train, selection) cases from --volumes or --data; the selection images are a share of the training
    data (``val/`` of a --data folder is never read: it is for ``evaluate``)."""
    from PromiseSegmentLib.data.datasets import load_image_folder, load_volume_pairs
    from PromiseSegmentLib.training.setup import check_training_cases

    if args.volumes:
        cases = load_volume_pairs(args.volumes, rule, args.axis, args.label, args.empty_share, args.seed, args.dense)
    else:
        root = Path(args.data)
        cases = load_image_folder(root, "train" if (root / "train").is_dir() else None, args.limit)
    train, select = split_for_selection(cases, args.val_fraction, args.seed)
    check_training_cases(train, select)
    where = " of train/ (val/ is left for evaluate)" if args.data and (Path(args.data) / "train").is_dir() else ""
    print(
        f"{len(cases)} training images{where}: {len(train)} to train on, {len(select)} to select the epoch", flush=True
    )
    return train, select


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="train an APM+IPS adapter on a frozen backbone")
    _add_data_options(p)
    p.add_argument("-o", "--output", required=True, help="adapter file to write (.safetensors)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing adapter (and the state of an interrupted run) instead of refusing",
    )
    add_backbone_args(p)
    add_intensity_args(p)
    _add_recipe_options(p)
    _add_schedule_options(p)
    _add_apm_options(p)
    p.add_argument("--name", type=name_arg, default=DEFAULT_NAME, help="target structure name stored in the adapter")
    p.set_defaults(func=cmd_train)


def _add_data_options(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="folder with images/ + masks/ (or a train/ subfolder of those)")
    src.add_argument(
        "--volumes",
        action="append",
        type=volume_pair_arg,
        metavar="IMAGE,LABELMAP",
        help="a 3D volume and its label map (NRRD/NIfTI); repeatable",
    )
    p.add_argument("--axis", default="K", type=axis_arg, help="slicing axis of --volumes (default K)")
    p.add_argument("--label", type=any_int, help="label value in the label maps (default: any non-zero)")
    p.add_argument(
        "--dense",
        action="store_true",
        help="--volumes: every slice is annotated, so a slice without the label is truly empty (default: "
        "only labelled slices are used; the others are unknown)",
    )
    p.add_argument(
        "--empty-share",
        type=non_negative_float,
        default=0.1,
        help="with --dense: empty slices per labelled slice (default 0.1)",
    )
    p.add_argument(
        "--val-fraction",
        type=open_fraction,
        help="share of the training images held out to select the epoch (default 0.1; 0.2 under 100 images)",
    )
    p.add_argument("--limit", type=positive_int, help="use at most this many images (quick trials)")


def _add_recipe_options(p) -> None:
    p.add_argument(
        "--recipe",
        choices=RECIPES,
        default="auto",
        help="auto (default): the best measured schedule for the data size; paper: ProMISe's (200 "
        "epochs, lr 1e-5, on-line augmentation; many hours on a CPU)",
    )
    p.add_argument(
        "--time-budget",
        type=positive_float,
        metavar="MINUTES",
        help="scale the plan to fit, and stop at the budget with the best adapter so far (default for the "
        "auto recipe: 30, unless --epochs, --apm-warmup or --augmented-copies set the schedule)",
    )
    p.add_argument(
        "--feature-cache",
        metavar="DIR",
        help="folder for the encoded images (default: in the user cache, removed when training ends)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in OUTPUT.state.pt (same options; --epochs may grow)",
    )


def _add_schedule_options(p) -> None:
    p.add_argument("--epochs", type=positive_int, help="epochs in all, warm-up included (default: the recipe's)")
    p.add_argument("--batch-size", type=positive_int, help="images per step (default: the recipe's, 4 or 8)")
    p.add_argument("--lr", type=positive_float, help=f"learning rate (default: the recipe's; auto {_AUTO.lr:g})")
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help="cosine: the learning rate decays towards 0 within the warm-up and within the joint phase",
    )
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the split, the weights and the draws (default 0)")
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        help="on-line augmentation: every image augmented and encoded afresh at every step (slow)",
    )
    p.add_argument(
        "--cache-features",
        action=argparse.BooleanOptionalAction,
        help="encode each image (and its augmented copies) once into the feature cache",
    )
    p.add_argument(
        "--augmented-copies",
        type=non_negative_int,
        metavar="K",
        help="with the feature cache: K augmented versions of each image, each encoded once",
    )
    p.add_argument(
        "--user-box-share",
        type=non_negative_float,
        help="joint phase: share of images prompted by a jittered ground-truth box, so IPS also serves "
        f"the user's box (auto: {_AUTO.user_box_share:g})",
    )
    user = "train IPS alone with prompts from the ground truth (what a user would give)"
    p.add_argument("--user-prompt", choices=("none", "box", "points"), help=user)


def _add_apm_options(p) -> None:
    p.add_argument("--no-apm", action="store_true", help="train IPS only (no automatic prompts)")
    p.add_argument("--no-ips", action="store_true", help="train the APM only (the decoder's mask token unshifted)")
    p.add_argument(
        "--apm-prompts",
        type=apm_prompts_arg,
        help="what the APM predicts: box, points or box,points (default: the backbone's; box for "
        "lite_medsam, points for SAM ViT)",
    )
    warmup = "epochs training the APM alone on its box loss before the joint phase"
    p.add_argument("--apm-warmup", type=non_negative_int, help=warmup)
    p.add_argument(
        "--apm-joint-lr",
        type=non_negative_float,
        help="the APM's learning rate after the warm-up, as a share of --lr (0: kept as warmed up)",
    )
    p.add_argument("--apm-width", type=positive_int, help=f"APM fusion width (auto: {_AUTO.apm_fusion_dim})")
    pool = f"average-pool the encoder taps by this (auto: {_AUTO.apm_tap_pool})"
    p.add_argument("--apm-tap-pool", type=positive_int, help=pool)
    p.add_argument(
        "--apm-blocks", type=head_blocks_arg, help="ResNet blocks per stage of the point head (3,4,6,3 = ResNet-34)"
    )
    p.add_argument("--points", type=positive_int, help="APM points N (default 16)")
    p.add_argument("--positive", type=non_negative_int, help="how many of the N slots are positive (default 8)")
    p.add_argument(
        "--box-loss-weight",
        type=non_negative_float,
        help="auxiliary APM loss against the mask's bounding box (0: the paper's mask loss only)",
    )
