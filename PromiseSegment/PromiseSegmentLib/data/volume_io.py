"""Reading images/volumes (NRRD, NIfTI, DICOM folder, PNG/JPEG) and writing Slicer ``.seg.nrrd`` files.

Geometry is carried as a 4x4 IJK->RAS matrix (Slicer's convention); files store LPS, so the
first two rows flip on the way in and out. A read never returns a geometry the file does not say: a DICOM
folder is checked slice by slice (``dicom_series``: irregular spacing is resampled at the real positions,
tilt/mixed orientations refused), and a NIfTI whose sform ITK cannot follow (a shear, voxel sizes other
than pixdim, a qform that disagrees) is refused rather than read at ITK's substitute geometry.
"""

from __future__ import annotations

import gzip
import itertools
import logging
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from PromiseSegmentLib.atomic_write import write_atomically
from PromiseSegmentLib.data.preprocessing import check_volume, count_nonfinite
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.names import DEFAULT_COLOR

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
    color: Tuple[float, float, float] = DEFAULT_COLOR
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


def read_volume(path, what: str = "input", labels: bool = False, series_uid: Optional[str] = None) -> Volume:
    """Read a 3D volume or 2D image; a folder is read as one DICOM series (the one named ``series_uid`` where
    it holds several; ``labels``: a resampled series takes the nearest slice's labels). NaN/infinite voxels
    are allowed (reported once; intensity rules ignore them)."""
    from PromiseSegmentLib.file_checks import check_input

    path = check_input(path, what, kind="any")
    image = _read_image(path, labels, series_uid)
    if image.GetDimension() > 3:
        raise InputError(f"{path} is a {image.GetDimension()}D image; extract one 3D frame first")
    ijk_to_ras = _ijk_to_ras(image)
    _check_nifti_sform(path, image, ijk_to_ras)
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
        log.warning(
            "%s: %d of %d voxels are NaN or infinite; they are ignored for the intensity range and shown as black",
            path,
            bad,
            array.size,
        )
    name = path.name.split(".")[0] or "volume"
    return Volume(array, ijk_to_ras, name)


def _read_image(path: Path, labels: bool = False, series_uid: Optional[str] = None):
    from PromiseSegmentLib.data.dicom_series import read_series

    try:
        return read_series(path, labels, series_uid) if path.is_dir() else _sitk().ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path}: {_itk_reason(exc)}") from None


def _itk_reason(exc: Exception) -> str:
    """The sentence of an ITK exception that says what is wrong (not where in ITK it was thrown)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    for line in lines:
        if "ITK ERROR:" in line:
            reason = re.sub(r"^.*ITK ERROR:\s*(\w+\(0x[0-9a-fA-F]+\):\s*)?", "", line)
            return re.sub(r"\s*Refusing to change .*$", "", reason) or line
    return lines[-1] if lines else "unknown format"


def _nifti_sform(path: Path) -> Optional[np.ndarray]:
    """The sform (voxel -> RAS, 4x4) of a NIfTI-1/-2 file whose sform code says it is set; else None."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
        header = f.read(540)
    layouts = {348: ("h", 254, "12f", 280), 540: ("i", 348, "12d", 400)}  # code type, offset; rows, offset
    for endian in "<>":
        layout = layouts.get(struct.unpack_from(endian + "i", header)[0]) if len(header) >= 348 else None
        if layout:
            code_type, code_at, rows_type, rows_at = layout
            if struct.unpack_from(endian + code_type, header, code_at)[0] <= 0:
                return None
            rows = np.reshape(struct.unpack_from(endian + rows_type, header, rows_at), (3, 4))
            return np.vstack([rows, [0, 0, 0, 1]])
    return None


def _check_nifti_sform(path: Path, image, ijk_to_ras: np.ndarray) -> None:
    """ITK keeps only a rotation, pixdim voxel sizes and sometimes the qform: refuse a NIfTI whose sform
    places any corner voxel elsewhere than ITK's geometry does (1 % of a voxel or 0.01 mm)."""
    sform = _nifti_sform(path)
    if sform is None:
        return
    size = list(image.GetSize()) + [1] * (3 - image.GetDimension())
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, s - 1) for s in size])]).T
    apart = np.linalg.norm((sform - ijk_to_ras) @ corners, axis=0).max()
    spacing = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    if apart <= max(0.01, 0.01 * spacing.min()):
        return
    axes = sform[:3, :3] / np.linalg.norm(sform[:3, :3], axis=0)
    cosines = np.abs(axes.T @ axes - np.eye(3)).max()
    if cosines > 1e-4:
        why = f"its sform has a shear (axes {np.degrees(np.arccos(cosines)):.1f} degrees apart, not 90)"
    elif not np.allclose(np.linalg.norm(sform[:3, :3], axis=0), spacing, rtol=1e-4):
        sizes = "x".join(f"{v:g}" for v in np.linalg.norm(sform[:3, :3], axis=0))
        why = f"its sform's voxel size ({sizes} mm) is not its pixdim ({'x'.join(f'{v:g}' for v in spacing)} mm)"
    else:
        why = "its qform (which ITK uses) and its sform disagree"
    raise InputError(
        f"{path}: {why}, so ITK would place it up to {apart:.1f} mm from where the sform does; "
        f"make the qform and sform agree (or resample the image) first"
    )


def write_segmentation(
    path,
    labelmap: np.ndarray,
    ijk_to_ras: np.ndarray,
    segments: Sequence[Segment],
    overwrite: bool = False,
    header: Optional[Dict[str, str]] = None,
) -> Path:
    """Write a KJI labelmap as a Slicer segmentation file (``.seg.nrrd``) at the volume's geometry
    (``.nrrd``/``.nii[.gz]``: the label map only; ``.png``: a one-slice result as a 0/255 mask).

    Written to a temporary file, read back and renamed, so a failure (e.g. a full disk) never leaves a
    half-written segmentation, and an existing file is only replaced with ``overwrite=True``. ``header``:
    extra key/value fields for NRRD files (e.g. what made the file; ``read_header_field`` reads them back).
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
    if path.name.lower().endswith(".nrrd"):
        for key, value in (header or {}).items():
            image.SetMetaData(key, value)

    def verify(tmp):
        if not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(tmp)), labelmap):
            raise OSError(f"{tmp} does not read back as what was written")

    suffix = ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix
    return write_atomically(
        path, lambda tmp: sitk.WriteImage(image, tmp, True), suffix=suffix, verify=verify, overwrite=overwrite
    )


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
        for key, value in {
            "ID": f"Segment_{n + 1}",
            "Name": seg.name,
            "NameAutoGenerated": "0",
            "Color": " ".join(f"{c:g}" for c in seg.color),
            "ColorAutoGenerated": "0",
            "LabelValue": str(seg.label),
            "Layer": "0",
            "Extent": f"0 {i - 1} 0 {j - 1} 0 {k - 1}",
            "Tags": "|",
        }.items():
            image.SetMetaData(prefix + key, value)
    image.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    image.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    image.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    return image


def read_header_field(path, key: str) -> Optional[str]:
    """One header field of an image file (NRRD: the fields ``write_segmentation`` was given); None when the
    file has no such field or cannot be read."""
    reader = _sitk().ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader.GetMetaData(key) if reader.HasMetaDataKey(key) else None


def read_labelmap(path) -> Volume:
    """Read a label map / ``.seg.nrrd`` (single layer) as a KJI integer array."""
    vol = read_volume(path, "label map", labels=True)
    labels = vol.array
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            odd = labels[~np.isfinite(labels) | (labels != np.round(labels))].ravel()[0]
            raise InputError(
                f"{path}: label values must be whole numbers, found {odd:g} (a probability map? "
                "threshold it into a label map first)"
            )
    if labels.size and (labels.min() < np.iinfo(np.int32).min or labels.max() > np.iinfo(np.int32).max):
        raise InputError(f"{path}: label values {labels.min():g}..{labels.max():g} do not fit 32-bit labels")
    return Volume(labels.astype(np.int32), vol.ijk_to_ras, vol.name)


def read_picture(path) -> np.ndarray:
    """A 2D image file's pixels in their own type: (H, W) grey (16-bit stays 16-bit) or (H, W, 3) colour
    (alpha dropped, palettes expanded). Pillow's ``convert`` would clip 16-bit grey at 255."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("L", "I;16", "I;16L", "I;16B", "F"):
            return np.asarray(im)
        if im.mode == "I":  # 16-bit PNGs in older Pillow; 32-bit TIFFs
            a = np.asarray(im)
            return a.astype(np.uint16) if a.size and 0 <= a.min() and a.max() <= 65535 else a
        if im.mode in ("1", "LA"):
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))


def read_rgb(path) -> np.ndarray:
    """A 2D image file as uint8 RGB (H, W, 3), decoded by the one picture rule
    (``preprocessing.picture_range``: 16-bit by its type's range, floats 0-1 ...); grey is repeated into
    three channels."""
    from PromiseSegmentLib.data.preprocessing import picture_range, to_uint8_rgb

    pixels = read_picture(path)
    found = picture_range(pixels)
    if found is None:
        raise InputError(
            f"{path}: pixel values {pixels.min():g}..{pixels.max():g} are not a picture's range "
            f"(0-255, 0-1, or an unsigned type's range)"
        )
    if found.how != "8-bit":
        log.info("%s: %s", path, found.how)
    return to_uint8_rgb(pixels, found.range)


def read_mask(path) -> np.ndarray:
    """A mask picture as booleans: 0/1 masks (any type) are > 0; others are above half their picture range
    (0/255 masks, JPEG-noisy masks, 16-bit 0/65535 masks)."""
    from PromiseSegmentLib.data.preprocessing import picture_range

    pixels = read_picture(path)
    grey = pixels if pixels.ndim == 2 else pixels.max(axis=2)
    if grey.size and grey.max() <= 1:
        return grey > 0
    found = picture_range(grey)
    if found is None:
        raise InputError(f"{path}: mask values {grey.min():g}..{grey.max():g} are not 0/1 or a picture's range")
    lo, hi = found.range
    return grey > (lo + hi) / 2


def overlay_rgb(
    rgb: np.ndarray,
    masks: Sequence[np.ndarray],
    colors: Optional[List[Tuple[int, int, int]]] = None,
    alpha: float = 0.45,
) -> np.ndarray:
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
