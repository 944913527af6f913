"""Regenerate Resources/Screenshots/ct-spleen.png, the extension catalog's picture: real bundled CT slices
(MSD spleen, CC-BY-SA 4.0) segmented by the default backbone, LiteMedSAM, from a box around the expert
mask, the result tinted red over the expert mask (green where they differ). Run from the repository root:

    .venv/bin/python tools/make_screenshot.py
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PromiseSegment"))

from PromiseSegmentLib.backbones.registry import load_backbone  # noqa: E402
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.data.volume_io import overlay_rgb  # noqa: E402
from PromiseSegmentLib.evaluation.metrics import dice  # noqa: E402
from PromiseSegmentLib.inference.engine import InferenceEngine

CASES = ("10003_spleen_26", "10024_spleen_59", "10019_spleen_8")


def main() -> None:
    bundled = ROOT / "PromiseSegment" / "PromiseSegmentLib" / "data" / "bundled" / "ct-spleen"
    engine = InferenceEngine(load_backbone("lite_medsam"))
    tiles = []
    for case in CASES:
        rgb = np.asarray(Image.open(bundled / "images" / f"{case}.jpg").convert("RGB"))
        truth = np.asarray(Image.open(bundled / "masks" / f"{case}.png")) > 0
        rows, cols = np.nonzero(truth)
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], float)
        emb = engine.encode([rgb])[0]
        mask = engine.predict(emb, Prompts(box=box), multimask_output=False).masks[0]
        print(f"{case}: Dice {dice(mask, truth):.3f}")
        tiles.append(overlay_rgb(rgb, [truth, mask], colors=[(40, 220, 80), (255, 60, 40)]))
    out = ROOT / "Resources" / "Screenshots" / "ct-spleen.png"
    Image.fromarray(np.concatenate(tiles, axis=1)).save(out, optimize=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
