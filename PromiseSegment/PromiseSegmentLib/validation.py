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

import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .errors import InputError, PromiseError
from .names import BACKBONE_KINDS, BOX_ONLY_BACKBONES, DEFAULT_BACKBONE, USER_BACKBONES
from .paths import expect_outputs, name_max

TEST_BACKBONES = ("tiny_random",)  # hidden registry entries (test fixtures), accepted but never listed
SEGMENT_SUFFIXES = (".seg.nrrd", ".nrrd", ".nii.gz", ".nii", ".png")
METADATA_KEY = "promise_segment"
ADAPTER_KEYS = ("format_version", "backbone", "apm", "ips", "intensity", "target", "training")
FORMAT_VERSION = 2
MAX_HEADER = 100 << 20
# TrainConfig's defaults, readable without importing torch (Testing/test_reliability.py keeps them equal).
TRAIN_DEFAULTS: Dict[str, Any] = dict(epochs=200, batch_size=8, lr=1e-5, seed=0, n_points=16, n_positive=8,
                                      apm_fusion_dim=256, apm_head_blocks=(3, 4, 6, 3), apm_tap_pool=1,
                                      box_loss_weight=1.0, apm_warmup_epochs=0, user_prompt="none",
                                      apm_joint_lr=1.0, lr_schedule="constant", augmented_copies=0)
USER_PROMPTS = ("none", "box", "points")
OPTION_NAMES = {"epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "n_points": "--points",
           "n_positive": "--positive", "apm_fusion_dim": "--apm-width", "apm_tap_pool": "--apm-tap-pool",
           "apm_head_blocks": "--apm-blocks", "box_loss_weight": "--box-loss-weight",
           "apm_warmup_epochs": "--apm-warmup", "user_prompt": "--user-prompt", "apm_prompts": "--apm-prompts",
           "apm_joint_lr": "--apm-joint-lr", "lr_schedule": "--lr-schedule",
           "augmented_copies": "--augmented-copies"}
LR_SCHEDULES = ("constant", "cosine")
MAX_AUGMENTED_COPIES = 16  # each copy is one more encoded image kept in memory (fp16)


class AdapterError(PromiseError, ValueError):
    """An adapter file is unreadable or does not fit the chosen backbone."""


# ------------------------------------------------------------------------------------------------ paths
def check_input(path, what: str, kind: str = "file") -> Path:
    """An existing, readable input: ``kind`` "file", "folder" or "any" (a file or a DICOM folder)."""
    p = Path(path).expanduser()
    check_utf8(p, what)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise InputError(f"{what} {p} does not exist") from None
    except NotADirectoryError:
        raise InputError(f"{what} {p} does not exist (a part of that path is a file, not a folder)") from None
    except OSError as exc:
        raise InputError(f"{what} {p} cannot be read: {exc.strerror.lower()}") from None
    is_dir = stat.S_ISDIR(st.st_mode)
    if is_dir and kind == "file":
        raise InputError(f"{what} {p} is a folder; expected a file")
    if not is_dir and kind == "folder":
        raise InputError(f"{what} {p} is a file; expected a folder")
    if not is_dir and not stat.S_ISREG(st.st_mode):
        raise InputError(f"{what} {p} is not a regular file")
    if not os.access(p, os.R_OK | (os.X_OK if is_dir else 0)):
        raise InputError(f"{what} {p} cannot be read: permission denied")
    return p


def check_output(path, overwrite: bool, what: str, suffixes: Optional[Sequence[str]] = None) -> Path:
    """An output file that may be written: a usable name (``_output_text``, ``_check_name``), a known
    extension, a writable folder, and nothing at the name unless ``overwrite`` - never a folder, FIFO, device
    or socket, which the final rename would replace (a FIFO's reader, /dev/null)."""
    raw = os.fspath(path)
    p = _output_text(raw, what)
    if raw.endswith("/"):
        raise InputError(f"{what} {raw} ends with '/': give a file name, not a folder")
    if suffixes and not any(p.name.lower().endswith(s) for s in suffixes):
        found = "".join(p.suffixes[-2:]) if p.suffixes else "no extension"
        raise InputError(f"{what} {p}: unknown output type ({found}); use {', '.join(suffixes)}")
    _check_name(p, what)
    if p.is_dir():
        raise InputError(f"{what} {p} is a folder; give a file name")
    try:
        st = os.lstat(p)
    except OSError:
        st = None  # nothing there, or a path check_writable_folder explains
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "a device"
        raise InputError(f"{what} {p} is not a regular file ({kind}); it is never replaced: remove it or choose "
                         f"another name")
    if st is not None and not overwrite:
        raise InputError(f"{what} {p} already exists; choose another name or pass --overwrite")
    check_writable_folder(p.parent, what)
    return p


def check_output_folder(path, what: str) -> Path:
    """An output folder: a usable name, not a file, writable or creatable."""
    out = _output_text(path, what)
    if out.exists() and not out.is_dir():
        raise InputError(f"{what} {out} is a file; give a folder")
    check_writable_folder(out, what)
    return out


def _output_text(raw, what: str) -> Path:
    """An output as typed, with '~' expanded as a shell would have: not empty (an unset shell variable would
    mean the current folder) and without a line break or other control character (a paste gone wrong; it
    would also break one-line messages and the CSV)."""
    text = os.fspath(raw)
    if not text.strip():
        raise InputError(f"{what} is empty; give a name")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise InputError(f"{what} {text!r} contains a line break or another control character; rename it")
    return Path(text).expanduser()


def check_utf8(p: Path, what: str) -> None:
    """Names that are not valid UTF-8 (legal on Linux; Python keeps them as surrogates) crash ITK's C++
    readers and writers mid-run: refused with the name as the user sees it."""
    try:
        str(p).encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(str(p)).decode("utf-8", "backslashreplace")
        raise InputError(f"{what} {shown}: the path is not valid UTF-8, which the image libraries cannot open; "
                         "rename it") from None


def _check_name(p: Path, what: str) -> None:
    """The file name fits the file system (NAME_MAX bytes): refused here rather than after the model has
    run. Its hidden temporary name then fits too (``paths.make_temp`` shortens it)."""
    check_utf8(p, what)
    n, limit = len(os.fsencode(p.name)), name_max(p.parent)
    if n > limit:
        raise InputError(f"{what} {p.name[:40]}...: the file name is too long ({n} bytes; this file system allows "
                         f"{limit})")


def check_writable_folder(folder, what: str) -> None:
    """``folder`` exists and is writable, or can be created: its nearest existing parent is a writable folder,
    reached through no dangling or looping symbolic link, and no '..' follows a folder still to be made
    ('missing/..' exists only once 'missing' does: the file would land where nothing was checked)."""
    existing, missing = Path(folder).expanduser().absolute(), []
    while not os.path.lexists(existing) and existing != existing.parent:
        missing.append(existing.name)
        existing = existing.parent
    if existing.is_symlink() and not existing.exists():
        raise InputError(f"cannot write {what} into {folder}: {existing} is a symbolic link to nothing (or a loop)")
    if ".." in missing:
        raise InputError(f"cannot write {what} into {folder}: {existing / missing[-1]} does not exist")
    if not existing.is_dir():
        raise InputError(f"cannot write {what} into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} into {folder}: {existing} is not writable")
    long = [m for m in missing if len(os.fsencode(m)) > name_max(existing)]
    if long:
        raise InputError(f"cannot write {what} into {folder}: the folder name {long[0][:40]}... is too long")


def check_distinct(named: Dict[str, Optional[Path]]) -> None:
    """No two of the given paths (inputs and outputs) are the same file."""
    seen: Dict[str, str] = {}
    for label, path in named.items():
        if path is None:
            continue
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{seen[key]} and {label} name the same file ({path}); choose another output name")
        seen[key] = label


def check_backbone(spec: Optional[str]) -> None:
    if spec is None or spec in USER_BACKBONES or spec in TEST_BACKBONES:
        return
    p = Path(spec).expanduser()
    if not p.exists():
        raise InputError(f"--backbone {spec!r} is neither a file nor one of: {', '.join(USER_BACKBONES)}")
    check_input(p, "backbone checkpoint")


def check_adapter_fits(backbone: Optional[str], meta: Optional[Dict[str, Any]], path) -> None:
    """An adapter and a ``--backbone`` registry name that cannot work together are refused before any
    download or load (the same rule as ``registry._compatible``, from the torch-free catalogue)."""
    if not backbone or meta is None or backbone not in BACKBONE_KINDS:
        return
    trained = meta["backbone"].get("name")
    if trained in BACKBONE_KINDS and trained != backbone and BACKBONE_KINDS[trained] != BACKBONE_KINDS[backbone]:
        raise AdapterError(f"{path} was trained on backbone {trained}; --backbone {backbone} cannot use it "
                           f"(leave out --backbone to use {trained})")


# ------------------------------------------------------------------------------------- adapter metadata
def read_safetensors_header(path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a truncated or padded file
    is refused). Reads no tensor and needs no torch."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            if not 2 <= n <= min(size - 8, MAX_HEADER):
                raise ValueError(f"header size {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): {exc}") from None
    except RecursionError:
        raise AdapterError(f"{path} is damaged: its header nests too deeply to be an adapter's") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path} is not a readable adapter file (safetensors): its header is not a table")
    entries = [t for k, t in header.items() if k != "__metadata__"]
    if not isinstance(header.get("__metadata__", {}), dict) or not all(_is_tensor_entry(t) for t in entries):
        raise AdapterError(f"{path} is damaged: its header's metadata or tensor table is malformed")
    ends = [t["data_offsets"][1] for t in entries]
    if 8 + n + max(ends, default=0) != size:
        raise AdapterError(f"{path} is truncated or damaged: {size} bytes, its header describes "
                           f"{8 + n + max(ends, default=0)}")
    return header


def _is_tensor_entry(t) -> bool:
    """A tensor entry as safetensors writes it: a dtype name, a shape and two whole-number byte offsets."""
    offsets = t.get("data_offsets") if isinstance(t, dict) else None
    return (isinstance(offsets, list) and len(offsets) == 2 and all(type(v) is int and v >= 0 for v in offsets)
            and isinstance(t.get("dtype"), str) and isinstance(t.get("shape"), list))


def read_adapter_metadata(path) -> Dict[str, Any]:
    """An adapter's metadata, fully checked; every problem is an ``AdapterError`` naming the file."""
    if not Path(path).is_file():
        try:
            check_input(path, "adapter")
        except InputError as exc:
            raise AdapterError(str(exc)) from None
    raw = (read_safetensors_header(path).get("__metadata__") or {}).get(METADATA_KEY)
    if raw is None:
        raise AdapterError(f"{path} is a safetensors file without PromiseSegment metadata; not an adapter")
    if not isinstance(raw, str):
        raise AdapterError(f"{path} is damaged: its {METADATA_KEY} metadata is not text")
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise AdapterError(f"{path}: its metadata is not valid JSON ({exc})") from None
    except RecursionError:
        raise AdapterError(f"{path} is damaged: its metadata nests too deeply to be an adapter's") from None
    _check_format(meta, path)
    try:
        _check_adapter_parts(meta)
    except (InputError, TypeError, ValueError) as exc:
        raise AdapterError(f"{path}: adapter metadata is invalid: {exc}") from None
    return meta


def _check_format(meta, path) -> None:
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if not isinstance(version, int) or isinstance(version, bool):
        raise AdapterError(f"{path}: its metadata has no integer format_version; not a PromiseSegment adapter")
    if version > FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format {version}; this PromiseSegment reads {FORMAT_VERSION}: "
                           f"update PromiseSegment")
    if version < FORMAT_VERSION:
        raise AdapterError(f"{path} has adapter format {version} (from before backbones were recorded, SAM ViT "
                           f"only); this PromiseSegment reads format {FORMAT_VERSION}: retrain the adapter")
    missing = [k for k in ADAPTER_KEYS[:-1] if k not in meta]
    if missing:
        raise AdapterError(f"{path}: adapter metadata lacks {', '.join(missing)}")
    extra = sorted(set(meta) - set(ADAPTER_KEYS))
    if extra:
        raise AdapterError(f"{path}: adapter metadata has unknown keys ({', '.join(extra)}); it was edited or "
                           f"written by another program")


def _check_adapter_parts(meta: Dict[str, Any]) -> None:
    from .preprocessing import IntensityRule

    b = meta["backbone"]
    types = {"name": str, "family": str, "identity": str, "image_size": int, "tap_channels": list}
    if not isinstance(b, dict) or "name" not in b:
        raise ValueError("it lacks backbone.name")
    bad = [k for k, t in types.items() if k in b and not isinstance(b[k], t)]
    if bad:
        raise ValueError(f"backbone {', '.join(bad)} of the wrong type")
    for part in ("apm", "ips"):
        if meta[part] is not None and not isinstance(meta[part], dict):
            raise ValueError(f"{part} must be a table or null")
    if meta["apm"] is None and meta["ips"] is None:
        raise ValueError("it has neither an APM nor IPS")
    if not isinstance(meta["intensity"], dict):
        raise ValueError("intensity must be a table")
    IntensityRule.from_dict(meta["intensity"])
    target = meta["target"]
    color = target.get("color", [0, 0, 0]) if isinstance(target, dict) else None
    if (not isinstance(target, dict) or not isinstance(target.get("name", ""), str) or not isinstance(color, list)
            or len(color) != 3 or not all(isinstance(c, (int, float)) and 0 <= c <= 1 for c in color)):
        raise ValueError("target must hold a name and an RGB colour of three numbers in 0..1")
    if not isinstance(meta.get("training", {}), dict):
        raise ValueError("training must be a table")


# --------------------------------------------------------------------------------------- training options
def check_train_settings(values: Dict[str, Any]) -> None:
    """The training options (``TrainConfig`` fields) that cannot train; one sentence, before any work."""
    for name in ("epochs", "batch_size", "n_points", "apm_fusion_dim", "apm_tap_pool"):
        if not isinstance(values[name], int) or values[name] < 1:
            raise InputError(f"{OPTION_NAMES[name]} must be at least 1, got {values[name]}")
    if not 0 <= values["n_positive"] <= values["n_points"]:
        raise InputError(f"--positive ({values['n_positive']}) must be between 0 and --points ({values['n_points']})")
    if not (isinstance(values["lr"], (int, float)) and math.isfinite(values["lr"]) and values["lr"] > 0):
        raise InputError(f"--lr must be a positive number, got {values['lr']}")
    if values["user_prompt"] not in USER_PROMPTS:
        raise InputError(f"--user-prompt must be one of {', '.join(USER_PROMPTS)}, got {values['user_prompt']!r}")
    if not 0 <= values["apm_warmup_epochs"] < values["epochs"]:
        raise InputError(f"--apm-warmup ({values['apm_warmup_epochs']}) must be shorter than --epochs "
                         f"({values['epochs']})")
    for name in ("box_loss_weight", "apm_joint_lr"):
        w = values.get(name, 0.0)
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise InputError(f"{OPTION_NAMES[name]} must be a non-negative number, got {w}")
    blocks = values["apm_head_blocks"]
    if len(blocks) != 4 or min(blocks) < 1:
        raise InputError(f"--apm-blocks must be four numbers of at least 1, got {list(blocks)}")
    if values.get("lr_schedule", "constant") not in LR_SCHEDULES:
        raise InputError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {values['lr_schedule']!r}")
    copies = values.get("augmented_copies", 0)
    if not isinstance(copies, int) or not 0 <= copies <= MAX_AUGMENTED_COPIES:
        raise InputError(f"--augmented-copies must be 0..{MAX_AUGMENTED_COPIES}, got {copies}")
    if copies and not values.get("cache_features", True):
        raise InputError("--augmented-copies needs --cache-features (the copies are encoded once and kept)")
    prompts = values.get("apm_prompts")
    if prompts is not None and (not prompts or not set(prompts) <= {"box", "points"}):
        raise InputError(f"--apm-prompts must be box, points or box,points, got {prompts}")


# ------------------------------------------------------------------------------------------- the commands
def validate(args) -> None:
    """Everything about a command's arguments that needs no model: run right after parsing. Sets
    ``args.outputs`` (the files the command may write; the path arguments become the checked paths, '~'
    expanded, so the command writes where the checks looked) and ``args.adapter_meta``; tells the writer
    (``paths.expect_outputs``) whether existing outputs may be replaced."""
    args.outputs, args.adapter_meta = [], None
    check = {"segment": _segment, "train": _train, "evaluate": _evaluate, "demo": _demo,
             "checkpoints": _checkpoints}[args.command]
    check(args)
    if getattr(args, "adapter", None):
        args.adapter = str(Path(args.adapter).expanduser())
        args.adapter_meta = read_adapter_metadata(args.adapter)
    if hasattr(args, "backbone"):
        check_backbone(args.backbone)
        check_adapter_fits(args.backbone, args.adapter_meta, getattr(args, "adapter", None))
    expect_outputs(args.outputs, getattr(args, "overwrite", False) or getattr(args, "resume", False))


def _segment(args) -> None:
    inp = check_input(args.input, "input", kind="any")
    out = check_output(args.output, args.overwrite, "output (-o)", SEGMENT_SUFFIXES)
    _check_nifti_case(out)
    overlay = check_output(args.overlay, args.overwrite, "overlay", (".png",)) if args.overlay else None
    check_distinct({"the input": inp, "-o": out, "--overlay": overlay,
                    "--adapter": Path(args.adapter) if args.adapter else None})
    args.outputs = [p for p in (out, overlay) if p is not None]
    args.output, args.overlay = str(out), str(overlay) if overlay else None


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
        raise InputError(f"{state} holds an interrupted run: pass --resume to continue it, or --overwrite to "
                         f"start again")
    check_train_settings(dict(train_values(args), cache_features=args.cache_features))
    if args.cache_features and not args.no_augment:
        raise InputError("--cache-features needs --no-augment (augmented images are encoded afresh each time)")
    if args.no_apm and args.no_ips:
        raise InputError("--no-apm and --no-ips leave nothing to train")
    args.outputs, args.output = [out, state], str(out)


def _check_nifti_case(out: Path) -> None:
    """.nii/.nii.gz in lower or upper case (written exactly, the temporary name lower-cased for ITK); mixed
    case is refused: ITK writes it, then neither it nor Slicer reads it back."""
    ext = ".nii.gz" if out.name.lower().endswith(".nii.gz") else ".nii" if out.name.lower().endswith(".nii") else ""
    found = out.name[len(out.name) - len(ext):]
    if ext and found not in (ext, ext.upper()):
        raise InputError(f"output (-o) {out.name}: NIfTI names in mixed case ({found}) cannot be read back by ITK "
                         f"or Slicer; use {ext} or {ext.upper()}")


def train_values(args) -> Dict[str, Any]:
    """The ``TrainConfig`` fields the train command's options give."""
    return dict(TRAIN_DEFAULTS, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                n_points=args.points, n_positive=args.positive, apm_fusion_dim=args.apm_width,
                apm_head_blocks=args.apm_blocks, apm_tap_pool=args.apm_tap_pool,
                box_loss_weight=args.box_loss_weight, apm_warmup_epochs=args.apm_warmup,
                user_prompt=args.user_prompt, apm_prompts=args.apm_prompts, apm_joint_lr=args.apm_joint_lr,
                lr_schedule=args.lr_schedule, augmented_copies=args.augmented_copies)


def _evaluate(args) -> None:
    root = check_input(args.data, "--data", kind="folder")
    base = root / args.split if args.split else root
    for sub in ("images", "masks"):
        check_input(base / sub, f"--data{'/' + args.split if args.split else ''} needs {sub}/:", kind="folder")
    out = check_output_folder(args.out, "--out")
    for inputs in (base / "images", base / "masks"):
        inside = os.path.relpath(os.path.realpath(out), os.path.realpath(inputs))
        if inside.split(os.sep)[0] != "..":
            raise InputError(f"--out {out} is inside --data's {inputs.name}/ folder; its figure.png would be read "
                             f"as an input next time: choose another folder")
    args.outputs = [check_output(out / name, args.overwrite, "output") for name in ("metrics.csv", "figure.png")]
    args.out, args.data = str(out), str(root)


def _demo(args) -> None:
    out = check_output_folder(args.out, "--out")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise InputError(f"{out} is not empty; choose another --out or pass --overwrite")
    args.out = str(out)
    check_train_settings(dict(TRAIN_DEFAULTS, epochs=args.warmup + args.epochs, apm_warmup_epochs=args.warmup,
                              lr=args.lr))
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
    from .preprocessing import resolve_axis
    from .prompts import check_ijk_prompts, voxel_index

    axis = resolve_axis(args.axis, ijk_to_ras)
    n = shape[axis]
    first, last = args.slices or (0, n - 1)
    if last >= n:
        raise InputError(f"--slices {first}:{last} is outside the volume: {n} slices along axis "
                         f"{'KJI'[axis]} (0..{n - 1})")
    points, boxes = args.point or [], args.box or []
    check_ijk_prompts(points, boxes, shape, axis)
    normal = 2 - axis  # IJK index of the slicing axis
    for p in points:
        if not first <= voxel_index(p[normal]) <= last:
            raise InputError(f"--point {','.join(f'{v:g}' for v in p)} is on slice {voxel_index(p[normal])}, "
                             f"outside --slices {first}:{last}")
    for b in boxes:
        lo, hi = sorted((voxel_index(b[normal]), voxel_index(b[normal + 3])))
        if hi < first or lo > last:
            raise InputError(f"--box {','.join(f'{v:g}' for v in b)} spans slices {lo}..{hi}, outside --slices "
                             f"{first}:{last}")
    if args.output.lower().endswith(".png") and shape[0] != 1:
        raise InputError(f"-o {args.output}: a PNG holds one slice but the result has {shape[0]} (K); use .seg.nrrd")
    return axis


def preflight(device: Optional[str], mode: Optional[str] = None, adapter_meta: Optional[dict] = None,
              backbone: Optional[str] = None, has_points: bool = False, has_box: bool = False) -> None:
    """The checks that need no weights: the mode rule (``modes.resolve_mode``, the one place that
    decides) accepts these prompts with this adapter - torch-free, so such a mistake is reported at once -
    then the device exists (that needs torch)."""
    if mode is not None:
        _check_mode(mode, adapter_meta, backbone, has_points, has_box)
    from .devices import pick_device

    try:
        dev = pick_device(device)
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"--device {device}: {exc}") from None
    if dev.type == "cuda" and dev.index is not None:
        import torch

        if dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0..)")


def _check_mode(mode: str, adapter_meta: Optional[dict], backbone: Optional[str], has_points: bool,
                has_box: bool) -> None:
    from types import SimpleNamespace

    from .modes import resolve_mode

    stand_in = None if adapter_meta is None else SimpleNamespace(apm=adapter_meta.get("apm"))
    resolved = resolve_mode(mode, stand_in, has_points, has_box)
    if resolved in ("ips", "vanilla") and not (has_points or has_box):
        raise InputError("without an adapter that has an APM, give prompts (--point or --box), or pass --adapter")
    name = backbone or (adapter_meta or {}).get("backbone", {}).get("name") or DEFAULT_BACKBONE
    if name in BOX_ONLY_BACKBONES and resolved in ("ips", "vanilla") and not has_box:
        raise InputError(f"{name} was trained with box prompts only (points alone segment nothing): give --box, "
                         f"or use an adapter with an APM for automatic prompts")