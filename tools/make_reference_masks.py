"""Regenerate the reference masks of Testing/integration/test_reference_masks.py: the default backbone (LiteMedSAM,
fp32) on bundled real CT slices, prompted with a box around the expert mask. Only rerun on purpose (a
deliberate change of results), then say why in the commit:

    .venv/bin/python tools/make_reference_masks.py
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PromiseSegment"))
sys.path.insert(0, str(ROOT / "Testing" / "utils"))

from reference_cases import CASES, OUT, reference_prediction  # noqa: E402


def main() -> None:
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.inference.engine import InferenceEngine

    engine = InferenceEngine(load_backbone("lite_medsam"), device="cpu")
    OUT.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        mask = reference_prediction(engine, case)
        Image.fromarray(mask.astype(np.uint8) * 255).save(OUT / f"{case}.png", optimize=True)
        print(f"{case}: {int(mask.sum())} pixels")


if __name__ == "__main__":
    main()
