"""The ``evaluate`` command: Dice, IoU and HD95 of a model on an image folder, with a figure."""

from __future__ import annotations

from pathlib import Path

from PromiseSegmentLib.cli.arg_types import (
    positive_int,
)
from PromiseSegmentLib.cli.arguments import (
    add_backbone_args,
    announce,
    engine_options,
    progress_bar,
)
from PromiseSegmentLib.cli.validation import preflight


def cmd_evaluate(args) -> int:
    from PromiseSegmentLib.data.datasets import load_image_folder
    from PromiseSegmentLib.evaluation.report import evaluate_cases, write_report

    prompt_kind = {"center": "points", "gt-points": "points", "gt-box": "box"}.get(args.prompt)
    preflight(args.device, args.mode, args.adapter_meta, args.backbone, prompt_kind == "points", prompt_kind == "box")
    cases = load_image_folder(args.data, args.split, args.limit)
    from PromiseSegmentLib.model.promise import load_model

    model = load_model(
        args.backbone, args.adapter, args.device, allow_mismatch=args.allow_backbone_mismatch, **engine_options(args)
    )
    announce(model.engine)
    with progress_bar("evaluating", "case") as b:
        rows = evaluate_cases(model, cases, mode=args.mode, prompt=args.prompt, progress=b)
    print(write_report(rows, cases, Path(args.out), overwrite=args.overwrite))
    return 0


def add_evaluate_command(sub) -> None:
    from PromiseSegmentLib.names import MODES

    p = sub.add_parser("evaluate", help="Dice/IoU/HD95 per case into a CSV, a summary and a PNG figure")
    p.add_argument("--data", required=True, help="folder with images/ + masks/ (or split subfolders: see --split)")
    p.add_argument("--split", help="subfolder (e.g. val)")
    p.add_argument("--adapter", help="adapter file (.safetensors); without it the frozen backbone alone")
    p.add_argument(
        "--allow-backbone-mismatch",
        action="store_true",
        help="evaluate an adapter on a backbone other than the one it was trained on (for comparisons)",
    )
    p.add_argument(
        "--mode", default="auto", choices=MODES, help="ProMISe mode (auto: automatic with an APM, else prompts)"
    )
    p.add_argument(
        "--prompt",
        choices=["none", "center", "gt-points", "gt-box"],
        default="none",
        help="simulated user prompts: none, one positive click at the image centre, 3+3 points "
        "sampled from the ground truth (seeded per case), or the ground truth's bounding box",
    )
    p.add_argument("--limit", type=positive_int, help="evaluate at most this many images (quick trials)")
    p.add_argument("--out", required=True, help="output folder for metrics.csv and figure.png")
    p.add_argument("--overwrite", action="store_true", help="replace metrics.csv and figure.png in --out")
    add_backbone_args(p)
    p.set_defaults(func=cmd_evaluate)
