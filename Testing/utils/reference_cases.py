"""The reference-mask cases (shared by Testing/integration/test_reference_masks.py and
tools/make_reference_masks.py)."""

from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "PromiseSegment" / "PromiseSegmentLib" / "data" / "bundled" / "ct-spleen"
OUT = Path(__file__).resolve().parents[1] / "reference" / "ct-spleen"
CASES = ("10003_spleen_26", "10019_spleen_8", "10024_spleen_59")


def reference_prediction(engine, case: str) -> np.ndarray:
    """LiteMedSAM on one bundled CT slice with the expert mask's bounding box as the prompt."""
    from PromiseSegmentLib.data.prompts import Prompts, mask_box

    rgb = np.asarray(Image.open(BUNDLED / "images" / f"{case}.jpg").convert("RGB"))
    truth = np.asarray(Image.open(BUNDLED / "masks" / f"{case}.png")) > 0
    return engine.predict(engine.encode([rgb])[0], Prompts(box=mask_box(truth)), multimask_output=False).masks[0]
