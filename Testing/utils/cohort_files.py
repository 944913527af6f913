"""Small CT volumes made of the bundled real spleen slices (cohort tests and the cohort benchmark)."""

import numpy as np
import SimpleITK as sitk

SIZE = 128  # the slices are shrunk: the encoder's cost is per slice, the reading and writing per voxel


def ct_volume(cases, first: int, count: int) -> np.ndarray:
    """``count`` bundled CT slices (grey, SIZE x SIZE) as one KJI uint8 volume."""
    slices = []
    for case in cases[first : first + count]:
        image = sitk.GetImageFromArray(case.rgb[..., 0].astype(np.float32))
        image.SetSpacing([case.rgb.shape[1] / SIZE, case.rgb.shape[0] / SIZE])
        small = sitk.Resample(image, [SIZE, SIZE], sitk.Transform(), sitk.sitkLinear, [0, 0], [1.0, 1.0])
        slices.append(sitk.GetArrayFromImage(small))
    return np.clip(np.stack(slices), 0, 255).astype(np.uint8)


def write_volume(path, array: np.ndarray, spacing=(0.8, 0.8, 2.5)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-50.0, -40.0, 10.0))
    sitk.WriteImage(image, str(path), True)
    return path
