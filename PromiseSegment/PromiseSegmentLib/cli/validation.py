"""The one validation layer of the command line: every argument, input and output path is checked here
before any model is loaded. Torch-free on purpose: an argument error comes back in well under a second.

Three kinds of checks:
- argparse types (``arg_types``: ``window_arg``, ``slices_arg``...): one value, at parse time;
- ``validate(args)``: paths, existing outputs, adapter metadata, combinations of options - run by
  ``cli.main`` right after parsing, for every command;
- helpers commands call once they have read their inputs (``check_segment_volume``) or, where torch is
  needed but no weights are (``preflight``), just before loading a model.
All raise ``InputError`` (or ``AdapterError`` for adapter files), which the command line reports as one
line with exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from PromiseSegmentLib.atomic_write import expect_outputs
from PromiseSegmentLib.cli.arguments import intensity_from_args
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.file_checks import check_distinct, check_input, check_output, check_output_folder
from PromiseSegmentLib.model.adapter_format import AdapterMetadata, check_adapter_fits, read_adapter_metadata
from PromiseSegmentLib.names import BOX_ONLY_BACKBONES, DEFAULT_BACKBONE, USER_BACKBONES
from PromiseSegmentLib.training.config import TrainConfig

TEST_BACKBONES = ("tiny_random",)  # hidden registry entries (test fixtures), accepted but never listed
SEGMENT_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".png")


def check_backbone(name_or_path: Optional[str]) -> None:
    if name_or_path is None or name_or_path in USER_BACKBONES or name_or_path in TEST_BACKBONES:
        return
    p = Path(name_or_path).expanduser()
    if not p.exists():
        raise InputError(f"--backbone {name_or_path!r} is neither a file nor one of: {', '.join(USER_BACKBONES)}")
    check_input(p, "backbone checkpoint")


# ------------------------------------------------------------------------------------------- the commands
def validate(args) -> None:
    """Everything about a command's arguments that needs no model: run right after parsing. Sets
    ``args.outputs`` (the files the command may write; the path arguments become the checked paths, '~'
    expanded, so the command writes where the checks looked) and ``args.adapter_meta``; tells the writer
    (``atomic_write.expect_outputs``) whether existing outputs may be replaced."""
    args.outputs, args.adapter_meta = [], None
    check = {"segment": _segment, "train": _train, "evaluate": _evaluate, "demo": _demo, "checkpoints": _checkpoints}[
        args.command
    ]
    check(args)
    if getattr(args, "adapter", None):
        args.adapter = str(Path(args.adapter).expanduser())
        args.adapter_meta = read_adapter_metadata(args.adapter)
    if hasattr(args, "backbone"):
        check_backbone(args.backbone)
        check_adapter_fits(args.backbone, args.adapter_meta, getattr(args, "adapter", None))
    expect_outputs(args.outputs, getattr(args, "overwrite", False) or getattr(args, "resume", False))


def _segment(args) -> None:
    args.cohort = bool(args.out_dir or args.manifest or len(args.input) != 1)
    if args.cohort:
        return check_cohort_args(args)
    if args.output is None:
        raise InputError("-o/--output is required for one input (or give --out-dir for a cohort)")
    args.input = args.input[0]
    inp = check_input(args.input, "input", kind="any")
    out = check_output(args.output, args.overwrite, "output (-o)", SEGMENT_SUFFIXES)
    _check_nifti_case(out)
    overlay = check_output(args.overlay, args.overwrite, "overlay", (".png",)) if args.overlay else None
    check_distinct(
        {"the input": inp, "-o": out, "--overlay": overlay, "--adapter": Path(args.adapter) if args.adapter else None}
    )
    args.outputs = [p for p in (out, overlay) if p is not None]
    args.output, args.overlay = str(out), str(overlay) if overlay else None


def check_cohort_args(args) -> None:
    """Torch-free checks of a cohort (``validation``): what a cohort cannot take, the output folder, the
    manifest, and the cases with their output names (two cases on one name are refused now)."""
    from PromiseSegmentLib.cohort.cases import find_cases, read_manifest

    if not args.out_dir:
        raise InputError("several inputs (or --manifest) need --out-dir for the outputs and results.csv")
    given = [name for name, value in (("-o", args.output), ("--overlay", args.overlay)) if value]
    given += [name for name, value in (("--point", args.point), ("--box", args.box)) if value]
    if given:
        raise InputError(f"{', '.join(given)} apply to one input; a cohort is segmented automatically by an adapter")
    if args.manifest and args.input:
        raise InputError("give the inputs either on the command line or in --manifest, not both")
    if not args.manifest and not args.input:
        raise InputError("no input: give volume files, folders, glob patterns or --manifest")
    out = check_output_folder(args.out_dir, "--out-dir")
    if args.manifest:
        args.cases = read_manifest(check_input(args.manifest, "--manifest"), out)
    else:
        args.cases = find_cases(args.input, out)
    if not args.adapter and any(case.adapter is None for case in args.cases):
        raise InputError(
            "a cohort is segmented by an adapter with an APM: give --adapter (or an adapter on every manifest row)"
        )
    args.out_dir, args.outputs = str(out), [out]


def _train(args) -> None:
    if args.data:
        root = check_input(args.data, "--data", kind="folder")
        args.data = str(root)
        base = root / "train" if (root / "train").is_dir() else root
        for sub in ("images", "masks"):
            check_input(base / sub, f"--data needs {sub}/:", kind="folder")
    else:
        for image, labels in args.volumes:
            check_input(image, "volume", kind="any")
            check_input(labels, "label map", kind="any")
        if args.label is not None and args.label < 1:
            raise InputError(f"--label must be a label value of at least 1, got {args.label}")
    if args.data and args.label is not None:
        raise InputError("--label applies to --volumes label maps only")
    out = check_output(args.output, args.overwrite or args.resume, "adapter (-o)", (".safetensors",))
    state = Path(str(out) + ".state.pt")
    if args.resume and not state.is_file():
        raise InputError(f"nothing to resume: {state} does not exist (train without --resume)")
    if state.exists() and not (args.resume or args.overwrite):
        raise InputError(
            f"{state} holds an interrupted run: pass --resume to continue it, or --overwrite to start again"
        )
    cfg = train_config(args, 100)  # the data are counted later; the checks do not depend on the count
    cfg.check()
    if cfg.cache_features and cfg.augment:
        raise InputError("--cache-features needs --no-augment (augmented images are encoded afresh each time)")
    if args.no_apm and args.no_ips:
        raise InputError("--no-apm and --no-ips leave nothing to train")
    args.outputs, args.output = [out, state], str(out)


def _check_nifti_case(out: Path) -> None:
    """.nii/.nii.gz in lower or upper case (written exactly, the temporary name lower-cased for ITK); mixed
    case is refused: ITK writes it, then neither it nor Slicer reads it back."""
    ext = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii" if out.name.lower().endswith(".nii") else ""
    found = out.name[len(out.name) - len(ext) :]
    if ext and found not in (ext, ext.upper()):
        raise InputError(
            f"output (-o) {out.name}: NIfTI names in mixed case ({found}) cannot be read back by ITK "
            f"or Slicer; use {ext} or {ext.upper()}"
        )


# train option (argparse dest) -> TrainConfig field; an option left out takes the recipe's value
TRAIN_OPTIONS = {
    "epochs": "epochs", "batch_size": "batch_size", "lr": "lr", "seed": "seed", "points": "n_points",
    "positive": "n_positive", "apm_width": "apm_fusion_dim", "apm_blocks": "apm_head_blocks",
    "apm_tap_pool": "apm_tap_pool", "box_loss_weight": "box_loss_weight", "apm_warmup": "apm_warmup_epochs",
    "user_prompt": "user_prompt", "apm_prompts": "apm_prompts", "apm_joint_lr": "apm_joint_lr",
    "lr_schedule": "lr_schedule", "augmented_copies": "augmented_copies", "augment": "augment",
    "cache_features": "cache_features", "user_box_share": "user_box_share",
}  # fmt: skip


def train_overrides(args) -> Dict[str, Any]:
    """The ``TrainConfig`` fields the user gave options for (the rest come from the recipe)."""
    given = {field: getattr(args, dest) for dest, field in TRAIN_OPTIONS.items() if getattr(args, dest) is not None}
    if args.no_apm:
        given["use_apm"] = False
    if args.no_ips:
        given["use_ips"] = False
    if given.get("augment") and "cache_features" not in given:
        given["cache_features"] = False  # on-line augmentation encodes afresh: nothing to cache
    given["target_name"] = args.name
    given["intensity"] = intensity_from_args(args).to_dict()
    return given


def train_config(args, n_train: int) -> TrainConfig:
    """The configuration of the train command for ``n_train`` training images: the recipe's, with the user's
    options on top (before torch is imported)."""
    from PromiseSegmentLib.training.recipe import recipe_config

    given = train_overrides(args)
    default = ("box",) if (args.backbone or DEFAULT_BACKBONE) in BOX_ONLY_BACKBONES else ("points",)
    box_apm = "box" in (given.get("apm_prompts") or default) and given.get("use_apm", True)
    return recipe_config(args.recipe, n_train, box_apm, **given)


def _evaluate(args) -> None:
    root = check_input(args.data, "--data", kind="folder")
    base = root / args.split if args.split else root
    for sub in ("images", "masks"):
        check_input(base / sub, f"--data{'/' + args.split if args.split else ''} needs {sub}/:", kind="folder")
    out = check_output_folder(args.out, "--out")
    for inputs in (base / "images", base / "masks"):
        inside = os.path.relpath(os.path.realpath(out), os.path.realpath(inputs))
        if inside.split(os.sep)[0] != "..":
            raise InputError(
                f"--out {out} is inside --data's {inputs.name}/ folder; its figure.png would be read "
                f"as an input next time: choose another folder"
            )
    args.outputs = [check_output(out / name, args.overwrite, "output") for name in ("metrics.csv", "figure.png")]
    args.out, args.data = str(out), str(root)


def _demo(args) -> None:
    out = check_output_folder(args.out, "--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} is not empty; choose another --out or pass --overwrite")
    args.out = str(out)
    TrainConfig(epochs=args.warmup + args.epochs, apm_warmup_epochs=args.warmup, lr=args.lr).check()
    args.outputs = [out]


def _checkpoints(args) -> None:
    if args.action == "list" and args.names:
        raise InputError("checkpoints list takes no names")
    if args.action == "verify" and not args.names:
        raise InputError("checkpoints verify needs backbone names or checkpoint files")
    for name in args.names:
        if args.action == "download" and name not in USER_BACKBONES:
            raise InputError(f"cannot download {name!r}: one of {', '.join(USER_BACKBONES)}")
        check_backbone(name)


# ------------------------------------------------------------------------------ after reading the inputs
def check_segment_volume(args, shape: Sequence[int], ijk_to_ras) -> int:
    """Prompts, slice range and output type against the volume read (KJI ``shape``); returns the axis."""
    from PromiseSegmentLib.data.preprocessing import resolve_axis
    from PromiseSegmentLib.data.prompts import check_ijk_prompts, voxel_index

    axis = resolve_axis(args.axis, ijk_to_ras)
    n = shape[axis]
    first, last = args.slices or (0, n - 1)
    if last >= n:
        raise InputError(
            f"--slices {first}:{last} is outside the volume: {n} slices along axis {'KJI'[axis]} (0..{n - 1})"
        )
    points, boxes = args.point or [], args.box or []
    check_ijk_prompts(points, boxes, shape, axis)
    normal = 2 - axis  # IJK index of the slicing axis
    for p in points:
        if not first <= voxel_index(p[normal]) <= last:
            raise InputError(
                f"--point {','.join(f'{v:g}' for v in p)} is on slice {voxel_index(p[normal])}, "
                f"outside --slices {first}:{last}"
            )
    for b in boxes:
        lo, hi = sorted((voxel_index(b[normal]), voxel_index(b[normal + 3])))
        if hi < first or lo > last:
            raise InputError(
                f"--box {','.join(f'{v:g}' for v in b)} spans slices {lo}..{hi}, outside --slices {first}:{last}"
            )
    if args.output.lower().endswith(".png") and shape[0] != 1:
        raise InputError(f"-o {args.output}: a PNG holds one slice but the result has {shape[0]} (K); use .seg.nrrd")
    return axis


def preflight(
    device: Optional[str],
    mode: Optional[str] = None,
    adapter_meta: Optional[AdapterMetadata] = None,
    backbone: Optional[str] = None,
    has_points: bool = False,
    has_box: bool = False,
) -> None:
    """The checks that need no weights: the mode rule (``modes.resolve_mode``, the one place that
    decides) accepts these prompts with this adapter - torch-free, so such a mistake is reported at once -
    then the device exists (that needs torch)."""
    if mode is not None:
        _check_mode(mode, adapter_meta, backbone, has_points, has_box)
    from PromiseSegmentLib.inference.devices import pick_device

    try:
        dev = pick_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--device {device}: {exc}") from None
    if dev.type == "cuda" and dev.index is not None:
        import torch

        if dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0..)")


def _check_mode(
    mode: str, adapter_meta: Optional[AdapterMetadata], backbone: Optional[str], has_points: bool, has_box: bool
) -> None:
    from PromiseSegmentLib.modes import resolve_mode

    name = backbone or (adapter_meta.backbone.name if adapter_meta else DEFAULT_BACKBONE)
    if not (has_points or has_box) and resolve_mode(mode, adapter_meta, False, False) in ("ips", "vanilla"):
        raise InputError("without an adapter that has an APM, give prompts (--point or --box), or pass --adapter")
    resolve_mode(mode, adapter_meta, has_points, has_box, name if name in BOX_ONLY_BACKBONES else None)
