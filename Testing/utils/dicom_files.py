"""DICOM series written slice by slice with chosen positions, orientations and tags (test inputs)."""

import numpy as np
import SimpleITK as sitk

AXIAL = (1.0, 0, 0, 0, 1.0, 0)
UID = "1.2.826.0.1.3680043.2.1125.7"
START = np.array([10.0, 20.0, 30.0])  # LPS position of the z=0 slice


def normal_of(iop):
    return np.cross(iop[:3], iop[3:])


def write_series(folder, zs, iop=AXIAL, spacing=(0.7, 0.9), shape=(8, 6), uid=UID, edit=None, prefix="s"):
    """One file per slice, slice ``n`` at START + z * normal with pixels 100 * (n + 1); ``edit(n, s)`` may
    change ``s`` (array, spacing, position, tags) before it is written. Returns the slices as written."""
    folder.mkdir(parents=True, exist_ok=True)
    writer, slices = sitk.ImageFileWriter(), []
    writer.KeepOriginalImageUIDOn()
    for n, z in enumerate(zs):
        s = {
            "array": np.full(shape, 100 * (n + 1), np.int16),
            "spacing": spacing,
            "position": START + z * normal_of(np.asarray(iop, float)),
            "iop": iop,
            "tags": {},
        }
        if edit:
            edit(n, s)
        image = sitk.GetImageFromArray(s["array"], isVector=s["array"].ndim == 3)
        image.SetSpacing(s["spacing"])
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.3",
            "0020|000e": uid,
            "0020|0013": str(n + 1),
            "0008|0018": f"{uid}.{n + 1}",
            "0020|0032": "\\".join(f"{v:.6f}" for v in s["position"]),
            "0020|0037": "\\".join(f"{v:.6f}" for v in s["iop"]),
            **s["tags"],
        }
        for key, value in tags.items():
            image.SetMetaData(key, value)
        s["file"] = folder / f"{prefix}{n:03d}.dcm"
        writer.SetFileName(str(s["file"]))
        writer.Execute(image)
        slices.append(s)
    return slices
