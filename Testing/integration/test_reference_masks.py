"""Reference-mask regression: the default backbone's results on bundled real CT must stay what they were
(stored masks, Dice >= 0.99), as well-kept Slicer extensions pin their results. A change of
preprocessing, resizing, prompt scaling or decoding shows up here; regenerate the masks only on purpose
with ``tools/make_reference_masks.py``."""

import numpy as np
import pytest
from PIL import Image
from reference_cases import BUNDLED, CASES, OUT, reference_prediction

from PromiseSegmentLib.evaluation.metrics import dice
from PromiseSegmentLib.inference.engine import InferenceEngine


@pytest.fixture(scope="module")
def engine(lite_medsam):
    return InferenceEngine(lite_medsam, device="cpu")


@pytest.mark.parametrize("case", CASES)
def test_default_backbone_reproduces_its_reference_mask(engine, case):
    stored = np.asarray(Image.open(OUT / f"{case}.png")) > 127
    expert = np.asarray(Image.open(BUNDLED / "masks" / f"{case}.png")) > 0
    got = reference_prediction(engine, case)
    assert got.shape == stored.shape and stored.any()
    assert dice(got, stored) >= 0.99
    assert dice(got, expert) >= 0.9, "the reference itself is a good segmentation of the expert's spleen"
