"""Medical volumes -> 2D slices SAM can read, and SAM's masks -> back onto the slice grid.

Conventions: a volume is a numpy array in KJI order (``array[k, j, i]``, as Slicer's
``arrayFromVolume`` and SimpleITK give it), optionally with a trailing RGB axis, plus its 4x4
IJK->RAS matrix. A slice is a 2D array (rows, cols); points are (x=col, y=row) in slice pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from PromiseSegmentLib.errors import InputError

# Array axis (0=K, 1=J, 2=I) -> (row axis, col axis) of the slices it produces, as IJK axis indices.
IN_PLANE_AXES = {0: (1, 0), 1: (2, 0), 2: (2, 1)}
_ANATOMY = {"sagittal": 0, "coronal": 1, "axial": 2}  # RAS axis each anatomical plane is normal to


def check_volume(array: np.ndarray) -> np.ndarray:
    """Accept KJI scalar volumes, KJI×3 RGB(A) volumes, 2D images and 2D RGB(A) images; return KJI[×3]."""
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[None]
    elif a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8 and min(a.shape[:2]) > 4:
        a = a[None]  # a single 2D colour image (H, W, C)
    if a.ndim == 4:
        if a.shape[-1] == 4:
            a = a[..., :3]  # RGBA: alpha carries no anatomy
        if a.shape[-1] != 3:
            raise InputError(
                f"volume has shape {array.shape}: a 4D (time series or multi-component) volume "
                f"cannot be segmented; extract one 3D frame or an RGB volume first"
            )
    elif a.ndim != 3:
        raise InputError(f"expected a 2D image or 3D volume, got an array of shape {array.shape}")
    if a.size == 0:
        raise InputError("the volume is empty")
    if np.iscomplexobj(a):
        raise InputError(f"complex-valued voxels ({a.dtype}) cannot be segmented; save the magnitude image first")
    if a.ndim == 3 and not np.issubdtype(a.dtype, np.number):
        raise InputError(f"unsupported voxel type {a.dtype}")
    return a


def count_nonfinite(array: np.ndarray) -> int:
    """How many voxels are NaN or infinite (0 for integer volumes)."""
    a = np.asarray(array)
    return 0 if not np.issubdtype(a.dtype, np.inexact) else int(a.size - np.count_nonzero(np.isfinite(a)))


def is_rgb(array: np.ndarray) -> bool:
    return array.ndim == 4


def ijk_spacing(ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel size along I, J, K (column norms of the direction*spacing part)."""
    return np.linalg.norm(np.asarray(ijk_to_ras, float)[:3, :3], axis=0)


def resolve_axis(axis: Union[int, str], ijk_to_ras: np.ndarray) -> int:
    """Array axis (0=K, 1=J, 2=I) to slice along; accepts 0/1/2, 'K'/'J'/'I' or axial/coronal/sagittal."""
    if isinstance(axis, (int, np.integer)):
        if axis not in (0, 1, 2):
            raise InputError(f"axis must be 0, 1 or 2 (array axes K, J, I), got {axis}")
        return int(axis)
    name = str(axis).lower()
    if name in ("k", "j", "i"):
        return "kji".index(name)
    if name in _ANATOMY:
        directions = np.abs(np.asarray(ijk_to_ras, float)[:3, :3] / ijk_spacing(ijk_to_ras))
        ijk_index = int(np.argmax(directions[_ANATOMY[name]]))  # IJK axis most aligned with the normal
        return 2 - ijk_index
    raise InputError(f"unknown axis {axis!r}: use axial, coronal, sagittal, K, J, I or 0/1/2")


def take_slice(volume: np.ndarray, axis: int, index: int) -> np.ndarray:
    return np.take(volume, index, axis=axis)


def put_slice(volume: np.ndarray, axis: int, index: int, values: np.ndarray) -> None:
    idx: List[Union[slice, int]] = [slice(None)] * 3
    idx[axis] = index
    volume[tuple(idx)] = values


def in_plane_spacing(ijk_to_ras: np.ndarray, axis: int) -> Tuple[float, float]:
    sp = ijk_spacing(ijk_to_ras)
    r, c = IN_PLANE_AXES[axis]
    return float(sp[r]), float(sp[c])


INTENSITY_KINDS = ("window", "percentile", "range", "rgb", "auto")


@dataclass(frozen=True)
class IntensityRule:
    """How scalar voxels become SAM's 0-255 RGB: CT window/level, percentiles, or a fixed range.
    NaN and infinite voxels are ignored when the range is computed and shown as black.

    "auto" (the default when neither an adapter nor the user chose): 8-bit volumes pass through as
    pictures, anything else gets percentiles ``low``-``high``. An explicit "percentile" rule applies to 8-bit
    volumes too."""

    kind: str = "auto"  # "window" | "percentile" | "range" | "rgb" | "auto"
    center: float = 40.0
    width: float = 400.0
    low: float = 0.5
    high: float = 99.5

    @staticmethod
    def ct(center: float = 40.0, width: float = 400.0) -> "IntensityRule":
        return IntensityRule("window", center=center, width=width)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "center": self.center, "width": self.width, "low": self.low, "high": self.high}

    @staticmethod
    def from_dict(d: dict) -> "IntensityRule":
        """A rule from its dict (adapter metadata, training options); unknown keys or kinds are refused."""
        extra = sorted(set(d) - {"kind", "center", "width", "low", "high"})
        if extra:
            raise InputError(f"unknown intensity setting(s) {', '.join(extra)}")
        rule = IntensityRule(**d)
        rule.check()
        return rule

    def check(self) -> None:
        """Refuse a rule that cannot map intensities (unknown kind, non-finite numbers, empty window)."""
        if self.kind not in INTENSITY_KINDS:
            raise InputError(f"unknown intensity kind {self.kind!r}; one of {', '.join(INTENSITY_KINDS)}")
        values = (self.center, self.width, self.low, self.high)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in values):
            raise InputError(f"intensity settings must be finite numbers, got {self.to_dict()}")
        if self.kind == "window" and self.width <= 0:
            raise InputError(f"window width must be positive, got {self.width:g}")
        if self.kind in ("percentile", "auto") and not 0 <= self.low < self.high <= 100:
            raise InputError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.low:g}, {self.high:g}")
        if self.kind == "range" and not self.low < self.high:
            raise InputError(f"intensity range must have low < high, got {self.low:g}, {self.high:g}")
        if self.kind in ("window", "range"):
            lo, hi = self.fixed_range()
            if not (hi > lo and np.isfinite(255.0 / (hi - lo))):
                raise InputError(
                    f"intensity window {lo:g}..{hi:g} is too narrow to map intensities to 0-255 "
                    f"(center {self.center:g}, width {self.width:g})"
                )

    def fixed_range(self) -> Tuple[float, float]:
        if self.kind == "window":
            return self.center - self.width / 2, self.center + self.width / 2
        return self.low, self.high

    def value_range(self, volume: np.ndarray) -> Tuple[float, float]:
        """(lo, hi) intensities mapped to 0 and 255, computed once per volume so slices agree.

        Colour volumes and the "rgb" rule (adapters trained on photos) decode the voxels as a picture
        (``picture_range``); a scalar volume whose values cannot be a picture is refused under "rgb"
        rather than clipped to 0-255 (CT in HU would turn into a black-and-white silhouette)."""
        self.check()
        if is_rgb(volume) or self.kind == "rgb" or (self.kind == "auto" and volume.dtype == np.uint8):
            found = picture_range(volume)
            if found is None:
                lo, hi = finite_min_max(volume)
                raise InputError(
                    f"{'colour voxel' if is_rgb(volume) else 'voxel'} values span {lo:g}..{hi:g}, which is not "
                    f"a picture's range (0-255, 0-1, or an unsigned type's range)"
                    + (
                        ""
                        if is_rgb(volume)
                        else "; this adapter expects pictures: give --window CENTER,WIDTH "
                        "or --percentiles LOW,HIGH (in Slicer: a custom window)"
                    )
                )
            return found.range
        if self.kind in ("window", "range"):
            return self.fixed_range()
        sample = volume.ravel()
        if sample.size > 2_000_000:  # percentiles of a strided sample: same answer, 1/40 of the time
            sample = sample[:: sample.size // 2_000_000]
        if count_nonfinite(sample):
            sample = sample[np.isfinite(sample)]
            if sample.size == 0:
                raise InputError("the volume has no finite voxel values (all NaN or infinite)")
        lo, hi = np.percentile(sample, [self.low, self.high])
        if hi <= lo:
            hi = lo + 1.0
        return float(lo), float(hi)


@dataclass(frozen=True)
class PictureRange:
    range: Tuple[float, float]
    how: str


def finite_min_max(array: np.ndarray) -> Tuple[float, float]:
    a = np.asarray(array)
    if np.issubdtype(a.dtype, np.inexact) and count_nonfinite(a):
        a = a[np.isfinite(a)]
    return (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)


def picture_range(array: np.ndarray) -> Optional[PictureRange]:
    """The one rule for decoding pictures (photos, colour volumes, image folders) whatever their type:
    8-bit and booleans as they are; other values that fit 0-255 as they are; unsigned integers beyond that
    by their type's full range (16-bit: 0-65535); floats within 0-1 as 0-1. None when the values fit none
    of these (e.g. signed CT values): such data is not a picture."""
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return PictureRange((0.0, 255.0), "8-bit")
    if a.dtype == bool:
        return PictureRange((0.0, 1.0), "binary")
    lo, hi = finite_min_max(a)
    if np.issubdtype(a.dtype, np.floating) and 0 <= lo and hi <= 1:
        return PictureRange((0.0, 1.0), "floats 0-1 scaled to 0-255")
    if 0 <= lo and hi <= 255:
        return PictureRange((0.0, 255.0), f"{a.dtype} values within 0-255")
    if np.issubdtype(a.dtype, np.unsignedinteger) and lo >= 0:
        top = float(np.iinfo(a.dtype).max)
        return PictureRange((0.0, top), f"{8 * a.dtype.itemsize}-bit, scaled by its type's range 0-{top:g}")
    return None


def to_uint8_rgb(slice2d: np.ndarray, value_range: Tuple[float, float]) -> np.ndarray:
    """A scalar slice (rows, cols) or RGB slice (rows, cols, 3) -> uint8 (rows, cols, 3): ``value_range``
    (lo, hi) maps to 0..255 (for 8-bit colour it is 0..255 and the pixels pass through unchanged)."""
    if slice2d.ndim == 3 and slice2d.dtype == np.uint8 and tuple(value_range) == (0.0, 255.0):
        return np.ascontiguousarray(slice2d)
    lo, hi = value_range
    scaled = (slice2d.astype(np.float32) - lo) * (255.0 / (hi - lo))
    if count_nonfinite(slice2d):
        scaled = np.where(np.isfinite(slice2d), scaled, 0.0)  # NaN/inf voxels: black
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out) if out.ndim == 3 else np.repeat(out[:, :, None], 3, axis=2)


@dataclass
class SliceGeometry:
    """Maps between a native slice grid (possibly anisotropic pixels) and a square-pixel grid."""

    native_shape: Tuple[int, int]
    spacing: Tuple[float, float] = (1.0, 1.0)  # (row, col) mm
    square_shape: Tuple[int, int] = field(init=False)

    MAX_SIDE = 4096  # never upsample beyond this (SAM works at 1024 anyway)

    def __post_init__(self):
        rows, cols = self.native_shape
        rs, cs = self.spacing
        target = min(rs, cs)
        if abs(rs - cs) <= 0.01 * target:
            self.square_shape = (rows, cols)
        else:
            new = (max(1, int(round(rows * rs / target))), max(1, int(round(cols * cs / target))))
            scale = min(1.0, self.MAX_SIDE / max(new))
            self.square_shape = (max(1, int(round(new[0] * scale))), max(1, int(round(new[1] * scale))))

    @property
    def is_identity(self) -> bool:
        return self.square_shape == tuple(self.native_shape)

    def image_to_square(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 (rows, cols, 3) -> uint8 on the square-pixel grid (bilinear)."""
        if self.is_identity:
            return rgb
        import torch  # here only: the command line validates arguments before torch is imported
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float()
        t = F.interpolate(t, self.square_shape, mode="bilinear", align_corners=False)
        return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

    def mask_to_square(self, mask: np.ndarray) -> np.ndarray:
        """bool (rows, cols) -> bool on the square-pixel grid: resampled exactly as the image is (bilinear,
        then half-way), so a mask and its image stay aligned."""
        if self.is_identity:
            return np.asarray(mask, bool)
        import torch
        import torch.nn.functional as F

        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
        return (F.interpolate(t, self.square_shape, mode="bilinear", align_corners=False)[0, 0] >= 0.5).numpy()

    def _scale(self) -> Tuple[float, float]:
        return self.square_shape[1] / self.native_shape[1], self.square_shape[0] / self.native_shape[0]

    def points_to_square(self, points: np.ndarray) -> np.ndarray:
        sx, sy = self._scale()
        p = np.asarray(points, float).reshape(-1, 2).copy()
        p[:, 0] = (p[:, 0] + 0.5) * sx - 0.5
        p[:, 1] = (p[:, 1] + 0.5) * sy - 0.5
        return p

    def points_to_native(self, points: np.ndarray) -> np.ndarray:
        sx, sy = self._scale()
        p = np.asarray(points, float).reshape(-1, 2).copy()
        p[:, 0] = (p[:, 0] + 0.5) / sx - 0.5
        p[:, 1] = (p[:, 1] + 0.5) / sy - 0.5
        return p

    def box_to_square(self, box: np.ndarray) -> np.ndarray:
        return self.points_to_square(np.asarray(box, float).reshape(2, 2)).reshape(4)


def slice_geometry(ijk_to_ras: np.ndarray, axis: int, native_shape: Sequence[int]) -> SliceGeometry:
    return SliceGeometry((int(native_shape[0]), int(native_shape[1])), in_plane_spacing(ijk_to_ras, axis))
