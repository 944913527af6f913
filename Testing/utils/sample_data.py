"""Code-generated sample data: an oblique, anisotropic MR-like volume with a lesion of known extent.

Used by the README's main job and by tests, so that everything runs offline with nothing bundled.
"""

from __future__ import annotations

from typing import List, Tuple

import numpy as np

from PromiseSegmentLib.data.preprocessing import IntensityRule, to_uint8_rgb
from PromiseSegmentLib.data.volume_io import Volume

SAMPLE_SPACING = (0.9, 0.9, 3.0)  # I, J, K in mm: thick slices, like a clinical MR series


def _rotation_z(degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _smooth_noise(rng, shape, passes: int = 3) -> np.ndarray:
    x = rng.standard_normal(shape)
    for _ in range(passes):  # cheap low-pass: average with shifted copies (in-plane only)
        x = (x + np.roll(x, 1, -1) + np.roll(x, -1, -1) + np.roll(x, 1, -2) + np.roll(x, -1, -2)) / 5
    return x / (x.std() + 1e-6)


def make_sample_volume(seed: int = 0, shape: Tuple[int, int, int] = (16, 96, 96)) -> Tuple[Volume, np.ndarray]:
    """(volume, truth) with truth a KJI uint8 mask of the lesion. Different seeds move the anatomy."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    si, sj, sk = SAMPLE_SPACING
    k, j, i = np.meshgrid(np.arange(nk) * sk, np.arange(nj) * sj, np.arange(ni) * si, indexing="ij")
    cj, ci = nj * sj / 2, ni * si / 2
    body = ((j - cj) / (0.45 * nj * sj)) ** 2 + ((i - ci) / (0.47 * ni * si)) ** 2 <= 1.0
    image = np.where(body, 300.0, 20.0)
    for _ in range(3):  # distractor structures: darker, rounder, fainter than the lesion
        c = (rng.uniform(0.3, 0.7) * nj * sj, rng.uniform(0.3, 0.7) * ni * si)
        r = rng.uniform(5, 9)
        image = np.where(body & (((j - c[0]) ** 2 + (i - c[1]) ** 2) < r * r), 160.0, image)
    lc = (rng.uniform(0.35, 0.65) * nk * sk, rng.uniform(0.35, 0.65) * nj * sj, rng.uniform(0.35, 0.65) * ni * si)
    radii = (rng.uniform(0.25, 0.35) * nk * sk, rng.uniform(9, 15), rng.uniform(9, 15))
    d = ((k - lc[0]) / radii[0]) ** 2 + ((j - lc[1]) / radii[1]) ** 2 + ((i - lc[2]) / radii[2]) ** 2
    truth = (d <= 1.0) & body
    image = np.where(truth, 650.0 + 80 * _smooth_noise(rng, shape), image)
    image = image + 25 * _smooth_noise(rng, shape, 1) + 10 * rng.standard_normal(shape)
    m = np.eye(4)
    m[:3, :3] = _rotation_z(rng.uniform(-20, 20)) @ np.diag(SAMPLE_SPACING)
    m[:3, 3] = (-ci, -cj, -nk * sk / 2)
    return Volume(image.astype(np.int16), m, f"sample{seed}"), truth.astype(np.uint8)


def make_training_slices(seeds, empty_share: float = 0.1) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(uint8 RGB slice, bool mask) pairs from generated volumes: every slice with lesion plus a
    share of empty ones, intensities mapped with the default percentile rule."""
    pairs = []
    rule = IntensityRule()
    for seed in seeds:
        vol, truth = make_sample_volume(seed)
        rng = np.random.default_rng(seed)
        vr = rule.value_range(vol.array)
        for k in range(vol.array.shape[0]):
            if truth[k].any() or rng.random() < empty_share:
                pairs.append((to_uint8_rgb(vol.array[k], vr), truth[k].astype(bool)))
    return pairs
