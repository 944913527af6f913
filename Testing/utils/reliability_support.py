"""Shared parts of the reliability battery (issue 11): the command line in-process, inputs, workspaces with
existing outputs, and holding, interrupting or killing a write mid-way (``paths.HOLD_ENV``).
Top-level imports stay light: kill tests import the test modules in a subprocess to run one writer."""

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from PromiseSegmentLib import paths
from PromiseSegmentLib.cli.arguments import PROGRESS_ENV
from PromiseSegmentLib.cli.main import main
from PromiseSegmentLib.paths import HOLD_ENV, is_temp_name

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "PromiseSegment"
TINY = ["--backbone", "tiny_random", "--device", "cpu"]
TRAIN_FAST = [
    "--epochs",
    "1",
    "--batch-size",
    "2",
    "--no-augment",
    "--cache-features",
    "--no-apm",
    "--val-fraction",
    "0.34",
    "--lr",
    "1e-3",
]


# ------------------------------------------------------------------------------------------------ helpers
def cli(capsys, *argv):
    """Run the command line in-process: (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's --help/--version; its errors come back as 2 the same way
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc, err, *phrases, status=2):
    """Exactly one line on stderr, the error line, with ``phrases``; no traceback; exit ``status``."""
    lines = err.strip().splitlines()
    assert rc == status and len(lines) == 1, f"rc {rc}, stderr:\n{err}"
    assert lines[0].startswith("promise-segment: error: ") and "Traceback" not in err, err
    for phrase in phrases:
        assert phrase.lower() in lines[0].lower(), lines[0]
    return lines[0]


def contents(files):
    return {str(f): (Path(f).read_bytes() if Path(f).is_file() else None) for f in files}


def temps(folder):
    return sorted(n for n in os.listdir(folder) if is_temp_name(n)) if Path(folder).is_dir() else []


def write_nrrd(path, array, ijk_to_ras=None):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(array)
    if ijk_to_ras is not None:
        lps = np.diag([-1, -1, 1, 1.0]) @ ijk_to_ras
        sp = np.linalg.norm(lps[:3, :3], axis=0)
        image.SetSpacing(sp.tolist())
        image.SetOrigin(lps[:3, 3].tolist())
        image.SetDirection((lps[:3, :3] / sp).ravel().tolist())
    sitk.WriteImage(image, str(path))
    return Path(path)


def save_folder(root, pairs):
    from PIL import Image

    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for n, (rgb, mask) in enumerate(pairs):
        Image.fromarray(rgb).save(root / "images" / f"c{n}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"c{n}.png")
    return root


@contextlib.contextmanager
def held_write(folder, name, nth=1, seconds=30):
    """Hold the ``nth`` write of ``name`` once it is complete on disk, before its rename; yields the
    marker file that appears when the hold begins."""
    marker = Path(folder) / f"hold-{name}.marker"
    saved = {k: os.environ.get(k) for k in (HOLD_ENV, HOLD_ENV + "_MARKER", HOLD_ENV + "_SECONDS")}
    os.environ.update(
        {HOLD_ENV: f"{name}:{nth}", HOLD_ENV + "_MARKER": str(marker), HOLD_ENV + "_SECONDS": str(seconds)}
    )
    paths._holds.clear()
    try:
        yield marker
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        paths._holds.clear()


@contextlib.contextmanager
def interrupt_held_write(folder, name, nth=1, sig=signal.SIGINT):
    """Send ``sig`` to this process while the ``nth`` write of ``name`` is held (a real Ctrl+C)."""
    fired, stop = [], threading.Event()
    with held_write(folder, name, nth) as marker:

        def watch():
            while not stop.is_set():
                if marker.exists():
                    fired.append(time.monotonic())
                    os.kill(os.getpid(), sig)
                    return
                time.sleep(0.02)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield fired
        finally:
            stop.set()
            thread.join()
            marker.unlink(missing_ok=True)


def kill_held_write(cmd, folder, name, nth=1, env=None, timeout=120, sig=signal.SIGKILL):
    """Start ``cmd``, send ``sig`` while the ``nth`` write of ``name`` is held; returns (exit status, stderr)."""
    marker = Path(folder) / f"kill-{name}.marker"
    env = dict(
        os.environ,
        **(env or {}),
        **{HOLD_ENV: f"{name}:{nth}", HOLD_ENV + "_MARKER": str(marker), "PYTHONPATH": str(PKG)},
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    held = marker.exists()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=timeout)
    marker.unlink(missing_ok=True)
    assert held, f"the write of {name} was never reached:\n{err}"
    return proc.returncode, err


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def _quiet_progress(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "1e9")  # no progress line unless a test asks for them
    paths._holds.clear()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the battery: a small oblique NRRD volume, image folders, a valid IPS adapter."""
    from sample_data import make_sample_volume, make_training_slices

    root = tmp_path_factory.mktemp("inputs")
    vol, truth = make_sample_volume(3, (4, 32, 32))
    pairs = [(rgb[::3, ::3].copy(), m[::3, ::3].copy()) for rgb, m in make_training_slices([1], 0.0)[:3]]
    assert all(m.any() for _, m in pairs)
    return {
        "vol": write_nrrd(root / "vol.nrrd", vol.array.astype(np.float32), vol.ijk_to_ras),
        "array": vol.array.astype(np.float32),
        "ijk_to_ras": vol.ijk_to_ras,
        "data": save_folder(root / "data", pairs),
        "empty": save_folder(root / "empty", [(rgb, np.zeros_like(m)) for rgb, m in pairs]),
        "adapter": make_adapter(root / "ips.safetensors"),
    }


def tiny_record():
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.model.adapter_format import BackboneRecord

    return BackboneRecord.of(load_backbone("tiny_random"))


def make_adapter(path, variant=0, record=None):
    """A valid IPS-only adapter for the tiny backbone (random first layers, so variants differ)."""
    import torch

    from PromiseSegmentLib.model.adapter import Adapter, save_adapter
    from PromiseSegmentLib.model.ips import IPS

    torch.manual_seed(variant)
    return save_adapter(Adapter(record or tiny_record(), ips=IPS(), target_name="Lesion"), path)


@pytest.fixture
def ws(tmp_path, files):
    """A workspace with existing outputs of every kind (which no failed run may change)."""
    from PromiseSegmentLib.data.volume_io import Segment, save_png, write_segmentation

    old = write_segmentation(tmp_path / "old.seg.nrrd", np.ones((4, 32, 32)), files["ijk_to_ras"], [Segment("x")])
    png = save_png(tmp_path / "old.png", np.full((8, 8, 3), 7, np.uint8))
    adapter = Path(shutil.copy(files["adapter"], tmp_path / "old.safetensors"))
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.csv").write_text("id,dice\nold,1\n")
    (tmp_path / "ev" / "figure.png").write_bytes(png.read_bytes())
    (tmp_path / "nomask" / "images").mkdir(parents=True)
    (tmp_path / "dir.seg.nrrd").mkdir()
    (tmp_path / "fresh.safetensors.state.pt").write_bytes(b"an interrupted run")
    os.mkfifo(tmp_path / "fifo.nrrd")
    ctx = {
        "tmp": tmp_path,
        "vol": files["vol"],
        "data": files["data"],
        "adapter": files["adapter"],
        "old": old,
        "oldpng": png,
        "old_adapter": adapter,
        "ev": tmp_path / "ev",
    }
    ctx["intact"] = [
        old,
        png,
        adapter,
        tmp_path / "ev" / "metrics.csv",
        tmp_path / "ev" / "figure.png",
        files["vol"],
        files["adapter"],
        tmp_path / "fresh.safetensors.state.pt",
    ]
    return ctx


@pytest.fixture
def no_model(monkeypatch):
    """Any backbone load fails the test: the refusals below must come before any model work."""
    from PromiseSegmentLib.backbones.registry import BACKBONES

    def loaded(*a, **k):
        raise AssertionError("a backbone was loaded before the arguments were refused")

    for cls in {type(b) for b in BACKBONES.values()}:
        monkeypatch.setattr(cls, "load", loaded)


def argv_for(template, ws):
    return [str(a).format(**ws) for a in template]


def _seg(files, out, *extra):
    return ["segment", files["vol"], "-o", out, "--point", "16,16,1", *TINY, *extra]
