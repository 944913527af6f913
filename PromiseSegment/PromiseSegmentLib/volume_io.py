"""Reading images/volumes (NRRD, NIfTI, DICOM folder, PNG/JPEG) and writing Slicer ``.seg.nrrd`` files.

Geometry is carried as a 4x4 IJK->RAS matrix (Slicer's convention); files store LPS, so the
first two rows flip on the way in and out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .paths import write_atomically
from .preprocessing import InputError, check_volume, count_nonfinite

log = logging.getLogger(__name__)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    array: np.ndarray  # KJI, or KJI×3 for RGB
    ijk_to_ras: np.ndarray  # 4x4
    name: str = "volume"


@dataclass
class Segment:
    name: str
    color: Tuple[float, float, float] = (0.9, 0.3, 0.2)
    label: int = 1


def _sitk():
    import SimpleITK as sitk  # imported lazily: Slicer ships its own, and most callers never read files

    return sitk


def _ijk_to_ras(image) -> np.ndarray:
    dim = image.GetDimension()
    direction = np.eye(3)
    direction[:dim, :dim] = np.asarray(image.GetDirection(), float).reshape(dim, dim)
    spacing = np.ones(3)
    spacing[:dim] = image.GetSpacing()
    origin = np.zeros(3)
    origin[:dim] = image.GetOrigin()
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    m[:3, 3] = origin
    return LPS_TO_RAS @ m


def read_volume(path, what: str = "input") -> Volume:
    """Read a 3D volume or 2D image; a folder is read as one DICOM series. NaN/infinite voxels are allowed
    (reported once; intensity rules ignore them)."""
    from .validation import check_input

    path = check_input(path, what, kind="any")
    image = _read_image(path)
    if image.GetDimension() > 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image; extract one 3D frame first")
    components = image.GetNumberOfComponentsPerPixel()
    if "complex" in image.GetPixelIDTypeAsString():
        raise InputError(f"{path} has complex-valued voxels; save the magnitude image first")
    if components not in (1, 3, 4):
        raise InputError(f"{path} has {components} components per voxel; expected a scalar or RGB image")
    array = _sitk().GetArrayFromImage(image)
    if image.GetDimension() == 2 and components > 1:
        array = array[None]  # a 2D colour image is one slice, whatever its size (never channels as slices)
    array = check_volume(array)
    bad = count_nonfinite(array)
    if bad and bad == array.size:
        raise InputError(f"{path} has no finite voxel values (all NaN or infinite)")
    if bad:
        log.warning("%s: %d of %d voxels are NaN or infinite; they are ignored for the intensity range and "
                    "shown as black", path, bad, array.size)
    name = path.name.split(".")[0] or "volume"
    return Volume(array, _ijk_to_ras(image), name)


def _read_image(path: Path):
    sitk = _sitk()
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"{path} is a folder with no DICOM series")
            if len(series) > 1:
                raise InputError(f"{path} holds {len(series)} DICOM series ({', '.join(series)}); "
                                 f"point at a folder with exactly one")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        raise InputError(f"cannot read {path}: {lines[-1] if lines else 'unknown format'}") from None


def write_segmentation(path, labelmap: np.ndarray, ijk_to_ras: np.ndarray, segments: Sequence[Segment],
                       overwrite: bool = False) -> Path:
    """Write a KJI labelmap as a Slicer segmentation file (``.seg.nrrd``) at the volume's geometry
    (``.nrrd``/``.nii[.gz]``: the label map only; ``.png``: a one-slice result as a 0/255 mask).

    Written to a temporary file, read back and renamed, so a failure (e.g. a full disk) never leaves a
    half-written segmentation, and an existing file is only replaced with ``overwrite=True``.
    """
    path = Path(path)
    labelmap = np.ascontiguousarray(labelmap, dtype=np.uint8)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or pass --overwrite")
    if path.suffix.lower() == ".png":
        if labelmap.ndim != 3 or labelmap.shape[0] != 1:
            raise InputError(f"{path}: a PNG holds one slice but the result has shape {labelmap.shape}")
        mask = (labelmap[0] > 0).astype(np.uint8) * 255 if len(segments) == 1 else labelmap[0]
        return save_png(path, mask)
    sitk = _sitk()
    image = _segmentation_image(labelmap, ijk_to_ras, segments)

    def verify(tmp):
        if not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(tmp)), labelmap):
            raise OSError(f"{tmp} does not read back as what was written")
    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    return write_atomically(path, lambda tmp: sitk.WriteImage(image, tmp, True), suffix=suffix, verify=verify)


def _segmentation_image(labelmap: np.ndarray, ijk_to_ras: np.ndarray, segments: Sequence[Segment]):
    sitk = _sitk()
    image = sitk.GetImageFromArray(labelmap)
    lps = LPS_TO_RAS @ np.asarray(ijk_to_ras, float)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    k, j, i = labelmap.shape
    for n, seg in enumerate(segments):
        prefix = f"Segment{n}_"
        for key, value in {"ID": f"Segment_{n + 1}", "Name": seg.name, "NameAutoGenerated": "0",
                           "Color": " ".join(f"{c:g}" for c in seg.color), "ColorAutoGenerated": "0",
                           "LabelValue": str(seg.label), "Layer": "0",
                           "Extent": f"0 {i - 1} 0 {j - 1} 0 {k - 1}", "Tags": "|"}.items():
            image.SetMetaData(prefix + key, value)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    return image


def read_labelmap(path) -> Volume:
    """Read a label map / ``.seg.nrrd`` (single layer) as a KJI integer array."""
    vol = read_volume(path, "label map")
    return Volume(vol.array.astype(np.int32), vol.ijk_to_ras, vol.name)


def read_rgb(path) -> np.ndarray:
    """A 2D image file as uint8 RGB (H, W, 3) (greyscale is repeated into three channels)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_mask(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


def overlay_rgb(rgb: np.ndarray, masks: Sequence[np.ndarray], colors: Optional[List[Tuple[int, int, int]]] = None,
                alpha: float = 0.45) -> np.ndarray:
    """Tint mask pixels and draw their outlines: a quick-look picture for people, not for measurement."""
    out = rgb.astype(np.float32).copy()
    colors = colors or [(255, 60, 40), (40, 220, 80), (60, 120, 255)]
    for mask, color in zip(masks, colors):
        m = mask.astype(bool)
        out[m] = (1 - alpha) * out[m] + alpha * np.array(color, np.float32)
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = color
    return out.clip(0, 255).astype(np.uint8)


def save_png(path, rgb: np.ndarray) -> Path:
    """An RGB (H, W, 3) or grey (H, W) uint8 picture as a PNG, written atomically and read back."""
    from PIL import Image

    path = Path(path)
    picture = Image.fromarray(np.ascontiguousarray(rgb))

    def verify(tmp):
        with Image.open(tmp) as back:
            back.load()
            if back.size != picture.size:
                raise OSError(f"{tmp} does not read back as a {picture.size} picture")
    return write_atomically(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=".png", verify=verify)
