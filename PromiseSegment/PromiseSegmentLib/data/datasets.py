"""Training/evaluation cases: 2D image+mask folders and 3D volumes+label maps -> (id, RGB, mask) cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np

from PromiseSegmentLib.data.preprocessing import (
    InputError,
    IntensityRule,
    check_volume,
    resolve_axis,
    slice_geometry,
    take_slice,
    to_uint8_rgb,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


@dataclass
class Case:
    id: str
    rgb: np.ndarray  # uint8 (H, W, 3), square pixels
    mask: np.ndarray  # bool (H, W)


def load_image_folder(folder, split: Optional[str] = None, limit: Optional[int] = None) -> List[Case]:
    """``<folder>[/<split>]/images/<id>.jpg`` with ``masks/<id>.png`` (0/255); sorted by id."""
    from PromiseSegmentLib.data.volume_io import read_mask, read_rgb

    root = Path(folder) / split if split else Path(folder)
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        raise InputError(f"{root} must contain images/ and masks/ folders (<id>.jpg + <id>.png)")
    mask_files = {p.stem: p for p in masks.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in mask_files)
    if not files:
        raise InputError(f"no image with a matching mask in {root}")
    cases = []
    for p in files[:limit]:
        rgb, mask = read_rgb(p), read_mask(mask_files[p.stem])
        if rgb.shape[:2] != mask.shape:
            raise InputError(f"{p.name}: image {rgb.shape[:2]} and mask {mask.shape} differ in size")
        cases.append(Case(p.stem, rgb, mask))
    return cases


def volume_cases(
    name: str,
    volume: np.ndarray,
    labelmap: np.ndarray,
    ijk_to_ras: np.ndarray,
    rule: IntensityRule,
    axis="K",
    label: Optional[int] = None,
    empty_share: float = 0.1,
    seed: int = 0,
    dense: bool = False,
) -> List[Case]:
    """The slices of a volume that contain the label, resampled to square pixels. A slice without the label
    is *unknown* (a user annotates some slices of a volume and leaves the rest for the model), unless
    ``dense`` says the annotation is complete: then ``empty_share`` × as many empty slices (chosen with
    ``seed``) are added as true negatives."""
    volume = check_volume(volume)
    if labelmap.shape != volume.shape[:3]:
        raise InputError(f"{name}: label map {labelmap.shape} does not match the volume {volume.shape[:3]}")
    target = labelmap > 0 if label is None else labelmap == label
    if not target.any():
        raise InputError(f"{name}: the segment/label is empty; nothing to learn from")
    ax = resolve_axis(axis, ijk_to_ras)
    vr = rule.value_range(volume)
    present = [s for s in range(volume.shape[ax]) if take_slice(target, ax, s).any()]
    empty = [s for s in range(volume.shape[ax]) if s not in set(present)]
    rng = np.random.default_rng(seed)
    n_empty = min(len(empty), int(round(empty_share * len(present)))) if dense else 0
    chosen = sorted(present + list(rng.choice(empty, n_empty, replace=False) if n_empty else []))
    cases = []
    for s in chosen:
        native = take_slice(volume, ax, s)
        geom = slice_geometry(ijk_to_ras, ax, native.shape)
        rgb = geom.image_to_square(to_uint8_rgb(native, vr))
        cases.append(Case(f"{name}_{s:04d}", rgb, geom.mask_to_square(take_slice(target, ax, s) > 0)))
    return cases


def load_volume_pairs(
    pairs: Sequence[Sequence[str]],
    rule: IntensityRule,
    axis="K",
    label=None,
    empty_share: float = 0.1,
    seed: int = 0,
    dense: bool = False,
) -> List[Case]:
    """(image file, label-map file) pairs (NRRD/NIfTI/...) -> slice cases (``volume_cases``)."""
    from PromiseSegmentLib.data.volume_io import read_labelmap, read_volume

    cases: List[Case] = []
    for image_path, label_path in pairs:
        vol, lab = read_volume(image_path), read_labelmap(label_path)
        if not np.allclose(vol.ijk_to_ras, lab.ijk_to_ras, atol=1e-3):
            raise InputError(f"{label_path} is not on the grid of {image_path}; resample it first")
        cases += volume_cases(
            vol.name, vol.array, lab.array, vol.ijk_to_ras, rule, axis, label, empty_share, seed, dense
        )
    return cases


def sample_points(mask: np.ndarray, n_pos: int, n_neg: int, rng: np.random.Generator):
    """Points (x, y) drawn uniformly from the foreground and background of ``mask``, with labels."""
    pts, labels = [], []
    for value, n in ((True, n_pos), (False, n_neg)):
        ys, xs = np.nonzero(mask == value)
        if len(ys) and n:
            idx = rng.choice(len(ys), n, replace=len(ys) < n)
            pts += list(zip(xs[idx], ys[idx]))
            labels += [int(value)] * n
    return np.asarray(pts, float).reshape(-1, 2), np.asarray(labels, int)
