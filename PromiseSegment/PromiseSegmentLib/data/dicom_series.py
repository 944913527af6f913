"""One DICOM series from a folder, at its real slice positions.

Why: ITK's series reader assumes parallel, evenly spaced slices along the slice normal, takes every slice's
orientation, pixel spacing and pixel type from one slice, and reports anything else at most as a raw
console warning, so a segmentation computed on such a read lands up to several millimetres away from the
anatomy. Here every slice's header is checked first; the rule is never a silently wrong geometry.

Refused (``InputError`` naming the folder, and the files at fault):

- no series, or several (by SeriesInstanceUID: which one is meant cannot be guessed unless the caller names
  it, as a cohort does for each series of a study folder: ``list_series``), or multi-frame files among others;
- slices of different sizes, pixel spacings or numbers of components, or with different orientations
  (ImageOrientationPatient; e.g. a localizer in the series);
- an ImageOrientationPatient that is not two perpendicular unit vectors (GDCM silently uses the identity);
- several slices without ImagePositionPatient / ImageOrientationPatient / PixelSpacing on each one;
- two slices at the same position (duplicates, or two acquisitions in one series);
- slice positions not along the slice normal (gantry tilt, shifted slices): a straight stack would be
  wrong; resample the series first (e.g. 3D Slicer's DICOM "acquisition geometry regularization").

Read as it is, silently, when evenly spaced: every real position within max(0.01 mm, 1 % of the spacing)
of the regular grid from the first to the last slice. The geometry is then ITK's.

Resampled, with one warning line, when a slice is missing or the spacing is uneven: the grid runs along
the slice normal from the first to the last real slice, at the smallest real step (coarser where that
would give more than 4x as many slices as were read); each grid slice is interpolated linearly between
the two nearest real slices (the nearest one for label maps). A real slice on the grid is copied
unchanged; every voxel is at its real world position.

Every slice is read on its own, so its own rescale slope/intercept applies (ITK's series reader casts
all slices to the first slice's pixel type, truncating e.g. a slope of 0.5 on another slice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from PromiseSegmentLib.errors import InputError

log = logging.getLogger(__name__)
POSITION_TOLERANCE_MM = 0.01  # or this fraction of the spacing, whichever is larger
POSITION_TOLERANCE = 0.01
DIRECTION_TOLERANCE = 1e-4  # on direction cosines: 0.05 mm at 500 mm from the origin
SPACING_TOLERANCE = 1e-4  # relative
MAX_UPSAMPLING = 4  # a resampled series has at most this many times the slices read
HINT = "point at a folder with one consistent series"


@dataclass
class Slice:
    """One file's header: all that is checked before any pixel is read."""

    file: Path
    size: Tuple[int, ...]  # columns, rows[, frames]
    spacing: Tuple[float, float]  # between columns, between rows (mm)
    has_spacing: bool  # PixelSpacing or ImagerPixelSpacing is there (else GDCM says 1 mm)
    components: int
    position: Optional[np.ndarray]  # ImagePositionPatient, LPS mm
    orientation: Optional[np.ndarray]  # ImageOrientationPatient: row and column direction cosines


def _sitk():
    import SimpleITK as sitk  # lazily, as in volume_io

    return sitk


@dataclass(frozen=True)
class SeriesInfo:
    uid: str  # SeriesInstanceUID
    description: str  # SeriesDescription ("" when absent)
    files: int


def list_series(folder: Path) -> List[SeriesInfo]:
    """The DICOM series directly in ``folder`` (none: an empty list), in SeriesInstanceUID order."""
    reader = _sitk().ImageSeriesReader()
    found = []
    for uid in sorted(reader.GetGDCMSeriesIDs(str(folder))):
        files = reader.GetGDCMSeriesFileNames(str(folder), uid)
        found.append(SeriesInfo(uid, _description(files[0]) if files else "", len(files)))
    return found


def _description(name: str) -> str:
    reader = _sitk().ImageFileReader()
    reader.SetFileName(name)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return ""
    return reader.GetMetaData("0008|103e").strip() if reader.HasMetaDataKey("0008|103e") else ""


def read_series(folder: Path, labels: bool = False, series_uid: Optional[str] = None):
    """The one DICOM series in ``folder`` (or the one named ``series_uid``) as a SimpleITK image whose voxels
    are at the real positions (``labels``: fill a resampled grid from the nearest slice, never a blend)."""
    slices = [_header(f) for f in _series_files(folder, series_uid)]
    _check_orientation_values(folder, slices)
    if len(slices) == 1:
        return _sitk().ReadImage(str(slices[0].file))  # one slice or a multi-frame file: GDCM's geometry
    _check_placed(folder, slices)
    _check_alike(folder, slices)
    normal = _axes(slices[0])[2]
    depths = np.array([s.position @ normal for s in slices])
    order = np.argsort(depths, kind="stable")
    slices, depths = [slices[n] for n in order], depths[order]
    _check_distinct_positions(folder, slices, depths)
    _check_along_normal(folder, slices, depths, normal)
    array = np.stack([_sitk().GetArrayFromImage(_sitk().ReadImage(str(s.file)))[0] for s in slices])
    step = (depths[-1] - depths[0]) / (len(depths) - 1)
    grid = depths[0] + step * np.arange(len(depths))
    if np.abs(depths - grid).max() <= max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE * step):
        return _image(array, slices[0], normal, step)
    grid, step = _regular_grid(depths)
    gaps = np.diff(depths)
    log.warning(
        "%s: slice positions are not evenly spaced (gaps %s-%s mm between %d slices: missing or uneven "
        "slices); resampled onto %d slices %s mm apart along the slice normal from the real positions "
        "(%s); slice numbers (K) count on that grid",
        folder,
        _mm(gaps.min()),
        _mm(gaps.max()),
        len(depths),
        len(grid),
        f"{step:.4g}",
        "nearest slice" if labels else "linear interpolation",
    )
    return _image(_resample(array, depths, grid, labels), slices[0], normal, step)


def _series_files(folder: Path, series_uid: Optional[str] = None) -> List[str]:
    """The files of the folder's one series (or of ``series_uid``); several series are refused, listed so the
    user can pick."""
    reader = _sitk().ImageSeriesReader()
    series = reader.GetGDCMSeriesIDs(str(folder))
    if not series:
        raise InputError(f"{folder} is a folder with no DICOM series")
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(f"{folder} holds no DICOM series {series_uid}")
        return list(reader.GetGDCMSeriesFileNames(str(folder), series_uid))
    files = {uid: reader.GetGDCMSeriesFileNames(str(folder), uid) for uid in series}
    if len(series) > 1:
        listed = ", ".join(f"{uid} ({len(names)} files)" for uid, names in files.items())
        raise InputError(f"{folder} holds {len(series)} DICOM series ({listed}); point at a folder with exactly one")
    return list(files[series[0]])


def _header(name: str) -> Slice:
    reader = _sitk().ImageFileReader()
    reader.SetFileName(name)
    reader.ReadImageInformation()
    return Slice(
        Path(name),
        reader.GetSize(),
        reader.GetSpacing()[:2],
        any(reader.HasMetaDataKey(tag) for tag in ("0028|0030", "0018|1164")),
        reader.GetNumberOfComponents(),
        _numbers(reader, "0020|0032", 3),
        _numbers(reader, "0020|0037", 6),
    )


def _numbers(reader, tag: str, count: int) -> Optional[np.ndarray]:
    """A multi-valued decimal tag (``a\\b\\c``) as floats; None when absent, empty or malformed."""
    if not reader.HasMetaDataKey(tag):
        return None
    try:
        values = np.array([float(v) for v in reader.GetMetaData(tag).split("\\")])
    except ValueError:
        return None
    return values if values.size == count and np.all(np.isfinite(values)) else None


def _check_orientation_values(folder: Path, slices: List[Slice]) -> None:
    for s in slices:
        if s.orientation is None:
            continue
        row, col = s.orientation.reshape(2, 3)
        if max(abs(row @ row - 1), abs(col @ col - 1), abs(row @ col)) > DIRECTION_TOLERANCE:
            raise InputError(
                f"{folder}: the ImageOrientationPatient of {s.file.name} ({_tag(s.orientation)}) is "
                f"not two perpendicular unit vectors; the slice directions are unknown"
            )


def _check_placed(folder: Path, slices: List[Slice]) -> None:
    """Position, orientation and pixel size on every slice: ITK would make up the missing ones."""
    for s in slices:
        missing = [
            tag
            for tag, there in (
                ("ImagePositionPatient (0020,0032)", s.position is not None),
                ("ImageOrientationPatient (0020,0037)", s.orientation is not None),
                ("PixelSpacing (0028,0030)", s.has_spacing),
            )
            if not there
        ]
        if missing:
            raise InputError(f"{folder}: {s.file.name} has no {missing[0]}, so where its slice lies is unknown")


ALIKE = (  # what, value of a slice, equal, shown as
    ("sizes", lambda s: s.size[:2], lambda a, b: a == b, lambda v: "x".join(map(str, v))),
    ("numbers of components per pixel", lambda s: s.components, lambda a, b: a == b, str),
    (
        "pixel spacings",
        lambda s: s.spacing,
        lambda a, b: np.allclose(a, b, rtol=SPACING_TOLERANCE, atol=0),
        lambda v: "x".join(map(_mm, v)) + " mm",
    ),
    (
        "orientations",
        lambda s: s.orientation,
        lambda a, b: np.abs(a - b).max() <= DIRECTION_TOLERANCE,
        lambda v: f"ImageOrientationPatient {_tag(v)}",
    ),
)


def _check_alike(folder: Path, slices: List[Slice]) -> None:
    """One file per slice, all of one size, pixel spacing, pixel kind and orientation (ITK would take the
    first slice's for all)."""
    for s in slices:
        if len(s.size) > 2 and s.size[2] > 1:
            raise InputError(
                f"{folder}: {s.file.name} is a multi-frame file ({s.size[2]} frames) "
                f"among {len(slices) - 1} other files; {HINT}"
            )
    first = slices[0]
    for what, value, equal, show in ALIKE:
        for s in slices[1:]:
            if not equal(value(s), value(first)):
                raise InputError(
                    f"{folder}: slices have different {what} ({show(value(first))} in "
                    f"{first.file.name}, {show(value(s))} in {s.file.name}); {HINT}"
                )


def _check_distinct_positions(folder: Path, slices: List[Slice], depths: np.ndarray) -> None:
    same = np.flatnonzero(np.diff(depths) <= POSITION_TOLERANCE_MM)
    if same.size:
        n = same[0]
        more = f", and {same.size - 1} more such pairs" if same.size > 1 else ""
        raise InputError(
            f"{folder}: 2 slices at the same position ({slices[n].file.name} and "
            f"{slices[n + 1].file.name}, {_mm(depths[n])} mm along the slice normal){more}: duplicates "
            f"or two acquisitions in one series; keep one of each"
        )


def _check_along_normal(folder: Path, slices: List[Slice], depths: np.ndarray, normal: np.ndarray) -> None:
    """Each slice's position on the line through the first one along the normal (a gantry tilt or shifted
    slices would be silently straightened into a stack)."""
    positions = np.array([s.position for s in slices], float)  # every slice has one (_check_placed)
    offsets = positions - positions[0] - np.outer(depths - depths[0], normal)
    sideways = np.linalg.norm(offsets, axis=1)
    tolerance = max(POSITION_TOLERANCE_MM, POSITION_TOLERANCE * min(slices[0].spacing))
    if sideways.max() > tolerance:
        tilt = np.degrees(np.arctan2(sideways[-1], depths[-1] - depths[0]))
        raise InputError(
            f"{folder}: slice positions are not along the slice normal (shifted up to "
            f"{_mm(sideways.max())} mm sideways over {_mm(depths[-1] - depths[0])} mm: a gantry tilt of "
            f"about {tilt:.1f} degrees, or shifted slices); resample the series onto a straight grid "
            f"first (e.g. 3D Slicer's DICOM acquisition geometry regularization)"
        )


def _regular_grid(depths: np.ndarray):
    """Positions from the first to the last real slice at the smallest real step (bounded); and the step."""
    span = depths[-1] - depths[0]
    step = max(np.diff(depths).min(), span / (MAX_UPSAMPLING * (len(depths) - 1)))
    count = int(np.ceil(span / step - POSITION_TOLERANCE)) + 1  # positions rounded in the files: not one more
    return depths[0] + np.linspace(0.0, span, count), span / (count - 1)


def _resample(array: np.ndarray, depths: np.ndarray, grid: np.ndarray, labels: bool) -> np.ndarray:
    """Each grid slice from the two real slices around it: linear (nearest for labels), in the input's type."""
    upper = np.clip(np.searchsorted(depths, grid), 1, len(depths) - 1)
    lower = upper - 1
    weight = (grid - depths[lower]) / (depths[upper] - depths[lower])
    weight = np.where(weight < 1e-6, 0.0, np.where(weight > 1 - 1e-6, 1.0, weight))  # on a real slice: a copy
    if labels:
        weight = np.round(weight)
    out = np.empty((len(grid),) + array.shape[1:], array.dtype)
    for n, (a, b, w) in enumerate(zip(lower, upper, weight)):
        if w in (0.0, 1.0):
            out[n] = array[b if w else a]
        else:
            blend = (1 - w) * array[a] + w * array[b]
            out[n] = np.rint(blend) if np.issubdtype(array.dtype, np.integer) else blend
    return out


def _image(array: np.ndarray, first: Slice, normal: np.ndarray, step: float):
    """A SimpleITK image of the KJI[C] array: origin at the first slice, axes row, column, normal."""
    sitk = _sitk()
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    row, col, _ = _axes(first)
    image.SetOrigin(np.asarray(first.position, float).tolist())
    image.SetSpacing([*first.spacing, float(step)])
    image.SetDirection(np.column_stack([row, col, normal]).ravel().tolist())
    return image


def _axes(s: Slice):
    """Unit row, column and normal directions of a slice (its orientation was checked to be orthonormal)."""
    row, col = (v / np.linalg.norm(v) for v in np.asarray(s.orientation, float).reshape(2, 3))
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def _mm(value: float) -> str:
    return f"{value:.1f}" if abs(value) >= 0.1 else f"{value:.3g}"


def _tag(values) -> str:
    return "\\".join(f"{v:.6g}" for v in values)
