"""Training augmentations (DESIGN §2) on a uint8 RGB image and its mask, driven by a torch.Generator
so that a run is reproducible and resumable: random resized crop, flips, shift-scale-rotate in one
affine warp, then brightness/contrast and blur or noise."""

from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _u(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def augment(rgb: np.ndarray, mask: np.ndarray, gen: torch.Generator) -> Tuple[np.ndarray, np.ndarray]:
    # float copies: the inputs may be read-only (cached or memory-mapped data sets)
    img = torch.from_numpy(np.array(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
    msk = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None]
    # Random resized crop (scale 0.6-1, aspect 3/4-4/3) + flips + shift/scale/rotate, as one affine map
    # from output to input coordinates in [-1, 1].
    area, aspect = _u(gen, 0.6, 1.0), math.exp(_u(gen, math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(1.0, math.sqrt(area * aspect)), min(1.0, math.sqrt(area / aspect))
    cx, cy = _u(gen, -(1 - cw), 1 - cw), _u(gen, -(1 - ch), 1 - ch)
    angle, scale = math.radians(_u(gen, -20, 20)), _u(gen, 0.9, 1.1)
    fx = -1.0 if _u(gen, 0, 1) < 0.5 else 1.0
    fy = -1.0 if _u(gen, 0, 1) < 0.5 else 1.0
    sx, sy = _u(gen, -0.06, 0.06), _u(gen, -0.06, 0.06)
    rot = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]) / scale
    lin = torch.diag(torch.tensor([cw * fx, ch * fy])) @ rot
    theta = torch.cat([lin, torch.tensor([[cx + sx], [cy + sy]])], dim=1)[None].float()
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    msk = F.grid_sample(msk, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    # Photometric: brightness/contrast, then blur or noise.
    img = (img - 128) * _u(gen, 0.8, 1.2) + 128 + _u(gen, -20, 20)
    r = _u(gen, 0, 1)
    if r < 0.2:
        sigma = _u(gen, 0.5, 1.5)
        k = torch.arange(-3, 4).float()
        w = torch.exp(-(k**2) / (2 * sigma**2))
        w = (w / w.sum()).to(img.dtype)
        img = F.conv2d(F.pad(img, (3, 3, 0, 0), mode="reflect"), w.view(1, 1, 1, 7).repeat(3, 1, 1, 1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, 3, 3), mode="reflect"), w.view(1, 1, 7, 1).repeat(3, 1, 1, 1), groups=3)
    elif r < 0.4:
        img = img + torch.randn(img.shape, generator=gen) * _u(gen, 2, 8)
    out = img[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return out, msk[0, 0].numpy() > 0.5
