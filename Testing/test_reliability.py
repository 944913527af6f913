"""Reliability battery (issue 11): a user's mistake is one line on stderr and exit status 2, before any model
work, with every existing output intact; an interruption, a kill or a full disk never leaves half a file at
an output's name nor replaces a good one, and leaves no temporary file that a later run does not remove.

The real command line runs in-process (``main``) or, for kills and timing, in a subprocess, on the seeded
tiny backbone (``--backbone tiny_random``); the full disk is a real tmpfs (root only, skipped otherwise).
Writes are caught mid-way with ``paths.HOLD_ENV`` (the write is complete on disk, not yet renamed).
Top-level imports stay light: kill tests import this module in a subprocess to run one writer.
"""
import contextlib
import hashlib
import http.server
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from PromiseSegmentLib import paths
from PromiseSegmentLib.cli import main
from PromiseSegmentLib.cli_args import PROGRESS_ENV, LineProgress
from PromiseSegmentLib.paths import HOLD_ENV, is_temp_name

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "PromiseSegment"
TINY = ["--backbone", "tiny_random", "--device", "cpu"]
TRAIN_FAST = ["--epochs", "1", "--batch-size", "2", "--no-augment", "--cache-features", "--no-apm",
              "--val-fraction", "0.34", "--lr", "1e-3"]


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
    os.environ.update({HOLD_ENV: f"{name}:{nth}", HOLD_ENV + "_MARKER": str(marker),
                       HOLD_ENV + "_SECONDS": str(seconds)})
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
    env = dict(os.environ, **(env or {}), **{HOLD_ENV: f"{name}:{nth}", HOLD_ENV + "_MARKER": str(marker),
                                             "PYTHONPATH": str(PKG)})
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
    from PromiseSegmentLib.sample_data import make_sample_volume, make_training_slices

    root = tmp_path_factory.mktemp("inputs")
    vol, truth = make_sample_volume(3, (4, 32, 32))
    pairs = [(rgb[::3, ::3].copy(), m[::3, ::3].copy()) for rgb, m in make_training_slices([1], 0.0)[:3]]
    assert all(m.any() for _, m in pairs)
    return {"vol": write_nrrd(root / "vol.nrrd", vol.array.astype(np.float32), vol.ijk_to_ras),
            "array": vol.array.astype(np.float32), "ijk_to_ras": vol.ijk_to_ras,
            "data": save_folder(root / "data", pairs),
            "empty": save_folder(root / "empty", [(rgb, np.zeros_like(m)) for rgb, m in pairs]),
            "adapter": make_adapter(root / "ips.safetensors")}


def tiny_record():
    from PromiseSegmentLib.adapter import BackboneRecord
    from PromiseSegmentLib.registry import load_backbone

    return BackboneRecord.of(load_backbone("tiny_random"))


def make_adapter(path, variant=0, record=None):
    """A valid IPS-only adapter for the tiny backbone (random first layers, so variants differ)."""
    import torch

    from PromiseSegmentLib.adapter import Adapter, save_adapter
    from PromiseSegmentLib.ips import IPS

    torch.manual_seed(variant)
    return save_adapter(Adapter(record or tiny_record(), ips=IPS(), target_name="Lesion"), path)


@pytest.fixture
def ws(tmp_path, files):
    """A workspace with existing outputs of every kind (which no failed run may change)."""
    from PromiseSegmentLib.volume_io import Segment, save_png, write_segmentation

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
    ctx = {"tmp": tmp_path, "vol": files["vol"], "data": files["data"], "adapter": files["adapter"], "old": old,
           "oldpng": png, "old_adapter": adapter, "ev": tmp_path / "ev"}
    ctx["intact"] = [old, png, adapter, tmp_path / "ev" / "metrics.csv", tmp_path / "ev" / "figure.png",
                     files["vol"], files["adapter"], tmp_path / "fresh.safetensors.state.pt"]
    return ctx


@pytest.fixture
def no_model(monkeypatch):
    """Any backbone load fails the test: the refusals below must come before any model work."""
    from PromiseSegmentLib.registry import BACKBONES

    def loaded(*a, **k):
        raise AssertionError("a backbone was loaded before the arguments were refused")

    for cls in {type(b) for b in BACKBONES.values()}:
        monkeypatch.setattr(cls, "load", loaded)


def argv_for(template, ws):
    return [str(a).format(**ws) for a in template]


# ----------------------------------------------------------------------------- class 1: options (exit 2)
SEG = ["segment", "{vol}", "-o", "{old}", "--overwrite", "--point", "16,16,1", *TINY]
TRAIN = ["train", "--data", "{data}", "-o", "{old_adapter}", "--overwrite", *TINY, "--epochs", "1"]
EVAL = ["evaluate", "--data", "{data}", "--out", "{ev}", "--overwrite", "--prompt", "gt-box", *TINY]
OPTION_ERRORS = {
    "device-foo": (SEG, ["--device", "foo"], "argument --device"),
    "device-meta": (SEG, ["--device", "meta"], "argument --device"),
    "window-nan": (SEG, ["--window", "nan,nan"], "finite"),
    "window-zero-width": (SEG, ["--window", "40,0"], "width must be positive"),
    "window-one-number": (SEG, ["--window", "40"], "CENTER,WIDTH"),
    "percentiles-inverted": (SEG, ["--percentiles", "99,1"], "LOW < HIGH"),
    "percentiles-over-100": (SEG, ["--percentiles", "1,101"], "HIGH <= 100"),
    "window-and-percentiles": (SEG, ["--window", "40,400", "--percentiles", "1,99"], "not allowed with"),
    "slices-letters": (SEG, ["--slices", "a:b"], "FIRST:LAST"),
    "slices-one-number": (SEG, ["--slices", "2"], "FIRST:LAST"),
    "slices-three-parts": (SEG, ["--slices", "1:2:3"], "FIRST:LAST"),
    "slices-reversed": (SEG, ["--slices", "3:1"], "must not come after"),
    "axis-unknown": (SEG, ["--axis", "5"], "0, 1, 2"),
    "point-two-numbers": (SEG, ["--point", "1,2"], "I,J,K"),
    "point-label-2": (SEG, ["--point", "1,2,1,2"], "label"),
    "point-nan": (SEG, ["--point", "nan,2,1"], "finite"),
    "point-inf": (SEG, ["--point", "1,inf,1"], "finite"),
    "box-five-numbers": (SEG, ["--box", "1,2,0,5,6"], "I0,J0,K0,I1,J1,K1"),
    "box-inf": (SEG, ["--box", "1,2,0,5,inf,1"], "finite"),
    "empty-name": (SEG, ["--name", " "], "must not be empty"),
    "unknown-mode": (SEG, ["--mode", "magic"], "invalid choice"),
    "unknown-backbone": (SEG, ["--backbone", "sam_vit_q"], "neither a file"),
    "epochs-0": (TRAIN, ["--epochs", "0"], "argument --epochs: must be at least 1"),
    "epochs-negative": (TRAIN, ["--epochs", "-3"], "at least 1"),
    "epochs-not-a-number": (TRAIN, ["--epochs", "ten"], "whole number"),
    "apm-width-0": (TRAIN, ["--apm-width", "0"], "--apm-width"),
    "batch-size-0": (TRAIN, ["--batch-size", "0"], "--batch-size"),
    "limit-0": (TRAIN, ["--limit", "0"], "--limit"),
    "limit-negative": (TRAIN, ["--limit", "-1"], "--limit"),
    "points-0": (TRAIN, ["--points", "0"], "--points"),
    "positive-over-points": (TRAIN, ["--points", "4", "--positive", "5"], "--positive (5)"),
    "lr-nan": (TRAIN, ["--lr", "nan"], "--lr"),
    "lr-zero": (TRAIN, ["--lr", "0"], "--lr"),
    "apm-blocks-short": (TRAIN, ["--apm-blocks", "1,2"], "--apm-blocks"),
    "apm-prompts-unknown": (TRAIN, ["--apm-prompts", "box,circle"], "--apm-prompts"),
    "val-fraction-1.5": (TRAIN, ["--val-fraction", "1.5"], "--val-fraction"),
    "warmup-not-shorter": (TRAIN, ["--epochs", "2", "--apm-warmup", "2"], "--apm-warmup (2)"),
    "cache-features-with-augment": (TRAIN, ["--cache-features"], "--no-augment"),
    "augmented-copies-without-cache": (TRAIN, ["--no-augment", "--augmented-copies", "2"], "--cache-features"),
    "augmented-copies-too-many": (TRAIN, ["--no-augment", "--cache-features", "--augmented-copies", "99"],
                                  "--augmented-copies must be 0..16"),
    "nothing-to-train": (TRAIN, ["--no-apm", "--no-ips"], "nothing to train"),
    "label-with-data": (TRAIN, ["--label", "2"], "--label"),
    "volumes-without-labelmap": (["train", "--volumes", "{vol}", "-o", "{old_adapter}", "--overwrite", *TINY], [],
                                 "IMAGE,LABELMAP"),
    "evaluate-limit-0": (EVAL, ["--limit", "0"], "--limit"),
    "evaluate-device-meta": (EVAL, ["--device", "meta"], "--device"),
    "checkpoints-verify-nothing": (["checkpoints", "verify"], [], "needs backbone names"),
    "checkpoints-list-names": (["checkpoints", "list", "lite_medsam"], [], "takes no names"),
    "checkpoints-download-unknown": (["checkpoints", "download", "sam_vit_q"], [], "cannot download"),
    "demo-epochs-0": (["demo", "--out", "{tmp}/demo", "--epochs", "0"], [], "--epochs"),
}


@pytest.mark.parametrize("case", list(OPTION_ERRORS))
def test_bad_options_are_one_line_before_any_model(case, ws, capsys, no_model):
    base, extra, phrase = OPTION_ERRORS[case]
    before = contents(ws["intact"])
    rc, out, err = cli(capsys, *argv_for(base + extra, ws))
    one_error(rc, err, phrase)
    assert contents(ws["intact"]) == before and not temps(ws["tmp"])


# --------------------------------------------------------------------- class 2: files and outputs (exit 2)
NEW = ["--point", "16,16,1", *TINY]
PATH_ERRORS = {
    "input-missing": (["segment", "{tmp}/nope.nrrd", "-o", "{tmp}/x.seg.nrrd", *NEW], "does not exist"),
    "input-under-a-file": (["segment", "{old}/v.nrrd", "-o", "{tmp}/x.seg.nrrd", *NEW], "a part of that path"),
    "input-fifo": (["segment", "{tmp}/fifo.nrrd", "-o", "{tmp}/x.seg.nrrd", *NEW], "not a regular file"),
    "output-exists": (["segment", "{vol}", "-o", "{old}", *NEW], "already exists"),
    "overlay-exists": (["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--overlay", "{oldpng}", *NEW],
                       "already exists"),
    "overlay-not-png": (["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--overlay", "{tmp}/o.jpg", *NEW],
                        "unknown output type"),
    "output-unknown-extension": (["segment", "{vol}", "-o", "{tmp}/x.xyz", *NEW], "unknown output type (.xyz)"),
    "output-no-extension": (["segment", "{vol}", "-o", "{tmp}/result", *NEW], "no extension"),
    "output-is-a-folder": (["segment", "{vol}", "-o", "{tmp}/dir.seg.nrrd", *NEW], "is a folder"),
    "output-under-a-file": (["segment", "{vol}", "-o", "{old}/x.seg.nrrd", *NEW], "is a file"),
    "output-is-the-input": (["segment", "{vol}", "-o", "{vol}", "--overwrite", *NEW], "same file"),
    "overlay-is-the-output": (["segment", "{vol}", "-o", "{tmp}/a.png", "--overlay", "{tmp}/a.png", *NEW],
                              "same file"),
    "adapter-missing": (["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--adapter", "{tmp}/no.safetensors", *NEW],
                        "does not exist"),
    "train-output-exists": (["train", "--data", "{data}", "-o", "{old_adapter}", *TINY], "already exists"),
    "train-output-not-safetensors": (["train", "--data", "{data}", "-o", "{tmp}/a.pt", *TINY], "unknown output type"),
    "train-data-without-masks": (["train", "--data", "{tmp}/nomask", "-o", "{tmp}/a.safetensors", *TINY], "masks/"),
    "train-labelmap-missing": (["train", "--volumes", "{vol},{tmp}/none.nrrd", "-o", "{tmp}/a.safetensors", *TINY],
                               "label map"),
    "resume-without-state": (["train", "--data", "{data}", "-o", "{tmp}/a.safetensors", "--resume", *TINY],
                             "nothing to resume"),
    "state-without-resume": (["train", "--data", "{data}", "-o", "{tmp}/fresh.safetensors", *TINY],
                             "interrupted run"),
    "evaluate-metrics-exist": (["evaluate", "--data", "{data}", "--out", "{ev}", "--prompt", "gt-box", *TINY],
                               "already exists"),
    "evaluate-out-is-a-file": (["evaluate", "--data", "{data}", "--out", "{old}", "--prompt", "gt-box", *TINY],
                               "is a file"),
    "evaluate-split-missing": (["evaluate", "--data", "{data}", "--split", "val", "--out", "{tmp}/e", *TINY],
                               "does not exist"),
    "demo-out-not-empty": (["demo", "--out", "{tmp}"], "not empty"),
    "checkpoint-file-missing": (["checkpoints", "verify", "{tmp}/none.pth"], "neither a file"),
}


@pytest.mark.parametrize("case", list(PATH_ERRORS))
def test_bad_files_and_existing_outputs_are_refused_before_any_model(case, ws, capsys, no_model):
    argv, phrase = PATH_ERRORS[case]
    before = contents(ws["intact"])
    rc, out, err = cli(capsys, *argv_for(argv, ws))
    one_error(rc, err, phrase)
    assert contents(ws["intact"]) == before and not temps(ws["tmp"])
    assert not (ws["tmp"] / "x.seg.nrrd").exists() and not (ws["tmp"] / "a.png").exists()


# ---------------------------------------------------------- class 3: prompts against the volume (exit 2)
VOLUME_ERRORS = {
    "point-outside-i": (["--point", "40,16,1"], "outside the volume"),
    "point-negative": (["--point", "-3,16,1"], "outside the volume"),
    "point-outside-k": (["--point", "16,16,4"], "outside the volume"),
    "point-outside-slices": (["--point", "16,16,3", "--slices", "0:1"], "outside --slices 0:1"),
    "axis-0-is-k": (["--axis", "0", "--point", "16,16,9"], "outside the volume"),
    "box-zero-area": (["--box", "10,5,1,10,20,1"], "no area"),
    "box-outside": (["--box", "40,40,1,50,50,1"], "does not overlap"),
    "box-outside-slices": (["--box", "5,5,3,20,20,3", "--slices", "0:1"], "outside --slices"),
    "slices-beyond-volume": (["--point", "16,16,1", "--slices", "0:9"], "outside the volume: 4 slices"),
    "slices-along-i": (["--axis", "I", "--point", "16,16,1", "--slices", "0:40"], "along axis I (0..31)"),
    "no-prompts-no-adapter": ([], "give prompts"),
    "ips-adapter-no-prompts": (["--adapter", "{adapter}"], "give prompts"),
    "mode-needs-adapter": (["--mode", "ips", "--point", "16,16,1"], "needs an adapter"),
    "apm-mode-with-ips-adapter": (["--mode", "apm+ips", "--adapter", "{adapter}"], "with an APM"),
    "box-only-backbone-points": (["--backbone", "lite_medsam", "--point", "16,16,1"], "box prompts only"),
    "png-for-a-3d-result": (["--point", "16,16,1", "-o", "{tmp}/x.png"], "PNG holds one slice"),
    "device-not-present": (["--point", "16,16,1", "--device", "cuda:99"], "--device cuda:99"),
}


@pytest.mark.parametrize("case", list(VOLUME_ERRORS))
def test_prompts_are_checked_against_the_volume_before_any_model(case, ws, capsys, no_model):
    extra, phrase = VOLUME_ERRORS[case]
    argv = ["segment", "{vol}", "-o", "{tmp}/x.seg.nrrd", *TINY, *extra]
    rc, out, err = cli(capsys, *argv_for(argv, ws))
    one_error(rc, err, phrase)
    assert not (ws["tmp"] / "x.seg.nrrd").exists() and not (ws["tmp"] / "x.png").exists()
    assert not temps(ws["tmp"])


# ------------------------------------------------------------------------- class 4: damaged input files
def _meta_edit(edit):
    def make(path, good_meta, good_file):
        meta = json.loads(json.dumps(good_meta))
        edit(meta)
        return _safetensors_with(path, json.dumps(meta))
    return make


def _safetensors_with(path, raw_meta):
    import torch
    from safetensors.torch import save_file

    save_file({"ips.x": torch.zeros(2)}, str(path), metadata={"promise_segment": raw_meta})
    return path


def _truncated(path, good):
    data = Path(good).read_bytes()
    Path(path).write_bytes(data[: len(data) - 1000])
    return path


ADAPTER_DAMAGE = {
    "missing-key": (_meta_edit(lambda m: m.pop("target")), "lacks target"),
    "extra-keys": (_meta_edit(lambda m: m.update(surprise=1, more=2)), "unknown keys (more, surprise)"),
    "string-version": (_meta_edit(lambda m: m.update(format_version="2")), "no integer format_version"),
    "newer-version": (_meta_edit(lambda m: m.update(format_version=9)), "update PromiseSegment"),
    "unknown-intensity-kind": (_meta_edit(lambda m: m["intensity"].update(kind="magic")), "unknown intensity kind"),
    "inverted-percentiles": (_meta_edit(lambda m: m["intensity"].update(low=99, high=1)), "percentiles"),
    "bad-colour": (_meta_edit(lambda m: m["target"].update(color=[1, 2])), "colour"),
    "no-modules": (_meta_edit(lambda m: m.update(apm=None, ips=None)), "neither an APM nor IPS"),
    "invalid-json": (lambda path, meta, good: _safetensors_with(path, "{not json"), "not valid JSON"),
    "truncated": (lambda path, meta, good: _truncated(path, good), "truncated"),
    "not-safetensors": (lambda path, meta, good: Path(path).write_bytes(b"junk" * 50) and path,
                        "not a readable adapter"),
}


@pytest.mark.parametrize("case", list(ADAPTER_DAMAGE))
def test_damaged_adapters_are_refused_naming_the_file(case, ws, files, capsys, no_model):
    from PromiseSegmentLib.adapter import read_metadata

    make, phrase = ADAPTER_DAMAGE[case]
    bad = make(ws["tmp"] / f"{case}.safetensors", read_metadata(files["adapter"]), files["adapter"])
    rc, out, err = cli(capsys, "segment", files["vol"], "-o", ws["tmp"] / "x.seg.nrrd", "--adapter", bad, *TINY)
    line = one_error(rc, err, phrase)
    assert str(bad) in line and not (ws["tmp"] / "x.seg.nrrd").exists()


def test_nan_adapter_weights_are_refused(ws, files, capsys):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(files["adapter"]), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["ips.mlp.0.weight"][0, 0] = float("nan")
    bad = ws["tmp"] / "nan.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    assert torch.isnan(tensors["ips.mlp.0.weight"]).any()
    rc, out, err = cli(capsys, "segment", files["vol"], "-o", ws["tmp"] / "x.seg.nrrd", "--adapter", bad,
                       "--point", "16,16,1", *TINY)
    one_error(rc, err, "NaN", str(bad))
    assert not (ws["tmp"] / "x.seg.nrrd").exists()


def test_complex_voxels_are_refused(ws, capsys, no_model):
    import SimpleITK as sitk

    image = sitk.Image([8, 8, 3], sitk.sitkComplexFloat32)
    sitk.WriteImage(image, str(ws["tmp"] / "complex.nrrd"))
    rc, out, err = cli(capsys, "segment", ws["tmp"] / "complex.nrrd", "-o", ws["tmp"] / "x.seg.nrrd", *NEW)
    one_error(rc, err, "complex")


def test_a_volume_without_finite_voxels_is_refused(ws, capsys, no_model):
    write_nrrd(ws["tmp"] / "nan.nrrd", np.full((2, 8, 8), np.nan, np.float32))
    rc, out, err = cli(capsys, "segment", ws["tmp"] / "nan.nrrd", "-o", ws["tmp"] / "x.seg.nrrd", *NEW)
    one_error(rc, err, "no finite voxel")


def test_a_small_rgb_png_is_one_slice_never_channels_as_slices(ws, capsys, no_model):
    from PIL import Image

    from PromiseSegmentLib.volume_io import read_volume

    rgb = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) * 9
    Image.fromarray(rgb).save(ws["tmp"] / "rgb.png")
    vol = read_volume(ws["tmp"] / "rgb.png")
    assert vol.array.shape == (1, 3, 3, 3)
    np.testing.assert_array_equal(vol.array[0], rgb)
    rc, out, err = cli(capsys, "segment", ws["tmp"] / "rgb.png", "-o", ws["tmp"] / "x.seg.nrrd", "--point", "1,1,2",
                       *TINY)
    one_error(rc, err, "outside the volume")  # k = 2 does not exist: one slice, not three


@pytest.fixture
def unreadable(tmp_path):
    """A file this process cannot open: mode 000, and (as root) a subprocess without CAP_DAC_OVERRIDE."""
    path = tmp_path / "secret.nrrd"
    write_nrrd(path, np.zeros((2, 8, 8), np.float32))
    path.chmod(0)
    if os.geteuid() != 0:
        return path, []
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("running as root without setpriv: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return path, [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def test_an_unreadable_input_is_not_reported_as_missing(unreadable, tmp_path):
    path, prefix = unreadable
    code = ("import sys; from PromiseSegmentLib.cli import main; "
            f"sys.exit(main(['segment', {str(path)!r}, '-o', {str(tmp_path / 'x.seg.nrrd')!r}, '--point', '1,1,0']))")
    r = subprocess.run(prefix + [sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(PKG)), timeout=120)
    line = one_error(r.returncode, r.stderr, "cannot be read", "permission denied")
    assert "does not exist" not in line


def test_training_on_empty_masks_is_refused_before_the_backbone(ws, files, capsys, no_model):
    rc, out, err = cli(capsys, "train", "--data", files["empty"], "-o", ws["tmp"] / "a.safetensors", *TINY,
                       *TRAIN_FAST)
    one_error(rc, err, "every training mask is empty")
    assert not (ws["tmp"] / "a.safetensors").exists()


def test_too_few_training_images_are_refused(ws, files, capsys, no_model):
    rc, out, err = cli(capsys, "train", "--data", files["data"], "-o", ws["tmp"] / "a.safetensors", *TINY,
                       *TRAIN_FAST, "--limit", "1")
    one_error(rc, err, "no training cases")


def test_train_defaults_match_trainconfig():
    from dataclasses import asdict

    from PromiseSegmentLib.training import TrainConfig
    from PromiseSegmentLib.validation import TRAIN_DEFAULTS

    defaults = asdict(TrainConfig())
    assert {k: defaults[k] for k in TRAIN_DEFAULTS} == {k: (tuple(v) if isinstance(v, list) else v)
                                                         for k, v in TRAIN_DEFAULTS.items()}


# ------------------------------------------------------------------ class 5: argument errors come fast
TIMED = {"epochs-0": OPTION_ERRORS["epochs-0"][:2], "device-meta": OPTION_ERRORS["device-meta"][:2],
         "slices-letters": OPTION_ERRORS["slices-letters"][:2],
         "positive-over-points": OPTION_ERRORS["positive-over-points"][:2],
         "output-exists": (PATH_ERRORS["output-exists"][0], []),
         "train-output-exists": (PATH_ERRORS["train-output-exists"][0], []),
         "evaluate-metrics-exist": (PATH_ERRORS["evaluate-metrics-exist"][0], []),
         "overlay-exists": (PATH_ERRORS["overlay-exists"][0], [])}


@pytest.mark.parametrize("case", list(TIMED))
def test_argument_errors_come_in_under_a_second_without_torch(case, ws):
    base, extra = TIMED[case]
    code = ("import json, sys, time; t = time.perf_counter(); from PromiseSegmentLib.cli import main\n"
            f"try:\n    rc = main({argv_for(base + extra, ws)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
            "print(json.dumps([rc, time.perf_counter() - t, 'torch' in sys.modules]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(PKG)))
    rc, seconds, torch_imported = json.loads(r.stdout.strip().splitlines()[-1])
    one_error(rc, r.stderr)
    assert not torch_imported and seconds < 1.0, (seconds, torch_imported)


# ----------------------------------------------------- class 6: every writer under a full disk, Ctrl+C, kill
def _cases(n=3, size=32):
    from PromiseSegmentLib.datasets import Case

    rng = np.random.default_rng(n)
    return [Case(f"c{i}", rng.integers(0, 255, (size, size, 3), dtype=np.uint8), rng.random((size, size)) > 0.5)
            for i in range(n)]


@lru_cache(maxsize=1)
def _tiny_engine():
    from PromiseSegmentLib.registry import load_backbone
    from PromiseSegmentLib.promise import engine_for

    return engine_for(load_backbone("tiny_random"), None, "cpu")


def _write_state(path, variant):
    from PromiseSegmentLib.training import TrainConfig, Trainer

    trainer = Trainer(_tiny_engine(), _cases(), [], TrainConfig(use_apm=False, epochs=1, seed=variant),
                      Path(str(path)[: -len(".state.pt")]))
    trainer.save_state(0)


def _write_report(folder, variant):
    from PromiseSegmentLib.evaluation import write_report

    cases, rng = _cases(), np.random.default_rng(variant)
    rows = [{"id": c.id, "dice": rng.random(), "iou": rng.random(), "hd95": 3.0, "pred": c.mask} for c in cases]
    write_report(rows, cases, Path(folder))


def _download(path, variant):
    from PromiseSegmentLib.checkpoints import download_file

    body = bytes([variant]) * 300_000
    download_file(f"{os.environ['RELIABILITY_SERVER']}/v{variant}", Path(path), hashlib.sha256(body).hexdigest())


WRITERS = {  # target name -> write(path, variant): each variant writes different, valid content
    "s.seg.nrrd": lambda p, v: __import__("PromiseSegmentLib.volume_io", fromlist=["x"]).write_segmentation(
        p, np.random.default_rng(v).integers(0, 2, (4, 64, 64)), np.eye(4),
        [__import__("PromiseSegmentLib.volume_io", fromlist=["x"]).Segment("x")], overwrite=True),
    "o.png": lambda p, v: __import__("PromiseSegmentLib.volume_io", fromlist=["x"]).save_png(
        p, np.random.default_rng(v).integers(0, 255, (64, 64, 3), dtype=np.uint8)),
    "a.safetensors": lambda p, v: make_adapter(p, v, _record()),
    "t.safetensors.state.pt": _write_state,
    "metrics.csv": lambda p, v: _write_report(Path(p).parent, v),
    "figure.png": lambda p, v: _write_report(Path(p).parent, v),
    "report.txt": lambda p, v: paths.write_bytes_atomically(p, str(v).encode() * 100_000),
    "ck.pth": _download,
}


def _record():
    from PromiseSegmentLib.adapter import BackboneRecord

    return BackboneRecord("tiny_random", "sam_vit", "seed:7", 1024, (64, 64, 64))


def write_target(name, folder, variant):
    """Run the writer of ``name`` into ``folder`` (also called in a subprocess by the kill tests)."""
    WRITERS[name](Path(folder) / name, variant)


class _Bodies(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = bytes([int(self.path.strip("/v"))]) * 300_000
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Bodies)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def writer_env(server, monkeypatch):
    monkeypatch.setenv("RELIABILITY_SERVER", server)


class Disk:
    """A real, small tmpfs; ``fill(leave)`` writes until the disk is full, then frees ``leave`` bytes."""

    def __init__(self, path):
        self.path = path

    def fill(self, leave=0):
        fd = os.open(self.path / ".filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\1" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        if leave:
            os.truncate(self.path / ".filler", max(0, os.path.getsize(self.path / ".filler") - leave))
        return self


@contextlib.contextmanager
def mounted_tmpfs(folder, size):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for the full-disk case needs root")
    folder.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True,
                       text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield Disk(folder)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture
def disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "8m") as d:
        yield d


@pytest.fixture
def small_disk(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "200k") as d:
        yield d


@pytest.mark.parametrize("name", list(WRITERS))
def test_full_disk_keeps_the_old_file_and_leaves_no_temporary(name, disk, writer_env):
    from PromiseSegmentLib.checkpoints import CheckpointError
    from PromiseSegmentLib.paths import WriteError

    write_target(name, disk.path, 0)
    before = contents([disk.path / name])
    disk.fill(leave=8192 if name == "figure.png" else 0)  # room for metrics.csv, not for the figure
    with pytest.raises((WriteError, CheckpointError), match="(?i)no space left|disk full") as err:
        write_target(name, disk.path, 1)
    assert "\n" not in str(err.value) and name in str(err.value)
    assert contents([disk.path / name]) == before and not temps(disk.path)


@pytest.mark.parametrize("name", list(WRITERS))
def test_ctrl_c_during_a_write_keeps_the_old_file_and_no_temporary(name, tmp_path, writer_env):
    write_target(name, tmp_path, 0)
    before = contents([tmp_path / name])
    with pytest.raises(KeyboardInterrupt):
        with interrupt_held_write(tmp_path, name) as fired:
            write_target(name, tmp_path, 1)
    assert fired and contents([tmp_path / name]) == before and not temps(tmp_path)


@pytest.mark.parametrize("name", list(WRITERS))
def test_a_kill_mid_write_leaves_the_old_file_and_a_later_write_cleans_up(name, tmp_path, writer_env):
    write_target(name, tmp_path, 0)
    before = contents([tmp_path / name])
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'Testing')!r}); import test_reliability as t; "
            f"t.write_target({name!r}, {str(tmp_path)!r}, 1)")
    kill_held_write([sys.executable, "-c", code], tmp_path, name)
    assert contents([tmp_path / name]) == before  # the final name still holds the complete old file
    assert temps(tmp_path), "the kill came before the temporary file existed"
    write_target(name, tmp_path, 2)  # a later run
    assert not temps(tmp_path) and contents([tmp_path / name]) != before


def test_files_get_the_usual_permissions(tmp_path, writer_env):
    old = os.umask(0o027)
    try:
        for name in WRITERS:
            write_target(name, tmp_path, 0)
    finally:
        os.umask(old)
    modes = {name: oct((tmp_path / name).stat().st_mode & 0o777) for name in WRITERS}
    assert set(modes.values()) == {oct(0o640)}, modes


# --------------------------------------------------------------- class 7: the commands under the same faults
def _seg(files, out, *extra):
    return ["segment", files["vol"], "-o", out, "--point", "16,16,1", *TINY, *extra]


def test_segment_on_a_full_disk_fails_in_one_line_and_keeps_the_old_result(small_disk, files, capsys):
    from PromiseSegmentLib.volume_io import Segment, write_segmentation

    out = write_segmentation(small_disk.path / "r.seg.nrrd", np.ones((4, 32, 32)), files["ijk_to_ras"],
                             [Segment("good")])
    before = contents([out])
    small_disk.fill()
    rc, stdout, err = cli(capsys, *_seg(files, out, "--overwrite"))
    one_error(rc, err, "no space left", str(out), "existing file is unchanged")
    assert contents([out]) == before and not temps(small_disk.path) and "wrote" not in stdout


def test_overlay_on_a_full_disk_fails_and_nothing_is_left_at_its_name(small_disk, files, tmp_path, capsys):
    small_disk.fill()
    overlay = small_disk.path / "o.png"
    rc, stdout, err = cli(capsys, *_seg(files, tmp_path / "r.seg.nrrd", "--overlay", overlay))
    one_error(rc, err, "no space left", str(overlay))
    assert (tmp_path / "r.seg.nrrd").is_file() and f"wrote {tmp_path / 'r.seg.nrrd'}" in stdout
    assert not overlay.exists() and not temps(small_disk.path)


def test_train_with_40_kb_free_fails_in_one_line_and_writes_nothing(disk, files, capsys):
    disk.fill(leave=40 << 10)
    out = disk.path / "a.safetensors"
    rc, stdout, err = cli(capsys, "train", "--data", files["data"], "-o", out, *TINY, *TRAIN_FAST)
    one_error(rc, err, "no space left", str(out))
    assert not out.exists() and not Path(str(out) + ".state.pt").exists() and not temps(disk.path)


def test_evaluate_on_a_full_disk_fails_in_one_line(disk, files, capsys):
    disk.fill()
    rc, stdout, err = cli(capsys, "evaluate", "--data", files["data"], "--limit", "1", "--prompt", "gt-box",
                          "--out", disk.path / "ev", *TINY)
    one_error(rc, err, "no space left")
    assert not (disk.path / "ev" / "metrics.csv").exists() and not temps(disk.path / "ev")


def test_ctrl_c_while_segment_writes_says_nothing_was_written(ws, files, capsys):
    before = contents([ws["old"]])
    with interrupt_held_write(ws["tmp"], ws["old"].name) as fired:
        rc, stdout, err = cli(capsys, *_seg(files, ws["old"], "--overwrite"))
    assert fired and rc == 130 and err.strip() == "promise-segment: cancelled; no output was written"
    assert contents([ws["old"]]) == before and not temps(ws["tmp"])


def test_ctrl_c_on_the_overlay_names_the_segmentation_that_was_kept(tmp_path, files, capsys):
    out, overlay = tmp_path / "r.seg.nrrd", tmp_path / "r.png"
    with interrupt_held_write(tmp_path, overlay.name) as fired:
        rc, stdout, err = cli(capsys, *_seg(files, out, "--overlay", overlay))
    assert fired and rc == 130 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert f"complete files written before the interruption: {out}" in err
    assert out.is_file() and not overlay.exists() and not temps(tmp_path)


def test_a_killed_segment_leaves_nothing_at_its_name_and_the_next_run_cleans_up(tmp_path, files, capsys):
    out = tmp_path / "r.seg.nrrd"
    argv = [str(a) for a in _seg(files, out)]
    kill_held_write([sys.executable, "-m", "PromiseSegmentLib.cli", *argv], tmp_path, out.name)
    assert not out.exists() and len(temps(tmp_path)) == 1
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 0 and out.is_file() and not temps(tmp_path), err


def test_sigterm_is_handled_like_ctrl_c(tmp_path, files):
    out = tmp_path / "r.seg.nrrd"
    rc, err = kill_held_write([sys.executable, "-m", "PromiseSegmentLib.cli", *map(str, _seg(files, out))], tmp_path,
                              out.name, sig=signal.SIGTERM)
    assert rc == 130 and err.strip() == "promise-segment: cancelled; no output was written"
    assert not out.exists() and not temps(tmp_path)


# --------------------------------------------------------- class 8: training interrupted, resumed, refused
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, files):
    """A real `train` run stopped by Ctrl+C while its second state file is written (after epoch 1 of 2)."""
    folder = tmp_path_factory.mktemp("interrupted")
    out = folder / "a.safetensors"
    argv = ["train", "--data", files["data"], "-o", out, *TINY, *TRAIN_FAST, "--epochs", "2"]
    stdout, stderr = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(PROGRESS_ENV, "1e9")
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            with interrupt_held_write(folder, out.name + ".state.pt", nth=2) as fired:
                rc = main([str(a) for a in argv])
    return {"folder": folder, "out": out, "argv": argv, "rc": rc, "err": stderr.getvalue(), "fired": fired}


def _copy_run(interrupted, tmp_path):
    folder = Path(shutil.copytree(interrupted["folder"], tmp_path / "run"))
    argv = [str(a).replace(str(interrupted["folder"]), str(folder)) for a in interrupted["argv"]]
    return folder, folder / "a.safetensors", argv


def test_ctrl_c_in_training_names_the_adapter_and_state_it_kept(interrupted):
    import torch

    out, err = interrupted["out"], interrupted["err"]
    assert interrupted["fired"] and interrupted["rc"] == 130 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "no output was written" not in err
    assert f"{out}" in err and f"{out}.state.pt" in err and "--resume" in err
    assert torch.load(f"{out}.state.pt", weights_only=True)["epoch"] == 0 and not temps(interrupted["folder"])


def test_resume_with_changed_options_says_what_differs(interrupted, tmp_path, capsys, no_model):
    folder, out, argv = _copy_run(interrupted, tmp_path)
    before = contents([out, Path(f"{out}.state.pt")])
    rc, stdout, err = cli(capsys, *argv, "--resume", "--lr", "0.01", "--batch-size", "3")
    one_error(rc, err, "other options", "--lr 0.001 then, 0.01 now", "--batch-size 2 then, 3 now")
    assert contents([out, Path(f"{out}.state.pt")]) == before


def test_resume_with_other_data_says_so(interrupted, tmp_path, capsys, files, no_model):
    folder, out, argv = _copy_run(interrupted, tmp_path)
    more = save_folder(tmp_path / "more", [(np.zeros((32, 32, 3), np.uint8), np.ones((32, 32), bool))] * 6)
    argv = [a if a != str(files["data"]) else str(more) for a in argv]
    rc, stdout, err = cli(capsys, *argv, "--resume")
    one_error(rc, err, "written for 2 training and 1 validation cases")


def test_resume_from_a_truncated_state_says_it_is_damaged(interrupted, tmp_path, capsys, no_model):
    folder, out, argv = _copy_run(interrupted, tmp_path)
    state = Path(f"{out}.state.pt")
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    rc, stdout, err = cli(capsys, *argv, "--resume")
    one_error(rc, err, "damaged", str(state))


def test_resume_finishes_the_run_and_removes_the_state(interrupted, tmp_path, capsys):
    from PromiseSegmentLib.adapter import read_metadata

    folder, out, argv = _copy_run(interrupted, tmp_path)
    rc, stdout, err = cli(capsys, *argv, "--resume")
    assert rc == 0 and f"wrote {out}" in stdout, err
    assert not Path(f"{out}.state.pt").exists() and not temps(folder)
    assert read_metadata(out)["training"]["epochs"] == 2


# ---------------------------------------------------------------------- class 9: no wrong result reported
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_ignored_by_the_intensity_rule(bad, files):
    from PromiseSegmentLib.preprocessing import IntensityRule, to_uint8_rgb

    clean = files["array"]
    dirty = clean.copy()
    dirty[1, 0, 0] = bad
    rule = IntensityRule()
    lo, hi = rule.value_range(dirty)
    assert np.isfinite([lo, hi]).all()
    np.testing.assert_allclose((lo, hi), rule.value_range(np.delete(clean.ravel(), 32 * 32)), rtol=1e-6)
    rgb = to_uint8_rgb(dirty[1], (lo, hi))
    assert (rgb[0, 0] == 0).all() and rgb[1:].std() > 10  # the bad voxel black, the rest a real picture


def test_a_nan_voxel_changes_nothing_but_itself_and_is_reported_once(tmp_path, files, capsys):
    from PromiseSegmentLib.volume_io import read_labelmap

    dirty = files["array"].copy()
    dirty[1, 0, 0] = np.nan
    nan_vol = write_nrrd(tmp_path / "nan.nrrd", dirty, files["ijk_to_ras"])
    rc, out, err = cli(capsys, *_seg(files, tmp_path / "clean.seg.nrrd"))
    assert rc == 0, err
    rc, out, err = cli(capsys, "segment", nan_vol, "-o", tmp_path / "nan.seg.nrrd", "--point", "16,16,1", *TINY)
    assert rc == 0 and err.count("NaN or infinite") == 1 and len(err.strip().splitlines()) == 1, err
    clean = read_labelmap(tmp_path / "clean.seg.nrrd").array
    with_nan = read_labelmap(tmp_path / "nan.seg.nrrd").array
    assert clean.sum() > 20  # a real segmentation, not an empty one
    assert 2 * (clean & with_nan).sum() / (clean.sum() + with_nan.sum()) > 0.95


def test_the_slice_count_is_along_the_chosen_axis_and_progress_lines_appear_in_logs(tmp_path, files, capsys,
                                                                                      monkeypatch):
    from PromiseSegmentLib.volume_io import read_labelmap

    monkeypatch.setenv(PROGRESS_ENV, "0")  # every update: stderr is not a terminal here
    out = tmp_path / "i.seg.nrrd"
    rc, stdout, err = cli(capsys, "segment", files["vol"], "-o", out, "--axis", "2", "--point", "16,16,1",
                          "--point", "17,14,2", *TINY)
    assert rc == 0, err
    mask = read_labelmap(out).array
    along_i = int(mask.any(axis=(0, 1)).sum())
    reported = int(re.search(r"on (\d+) slices along I", stdout)[1])
    assert reported == along_i and 1 <= along_i <= 2 and mask.any(axis=(1, 2)).sum() > along_i
    progress = [ln for ln in err.splitlines() if ln.startswith("promise-segment: segmenting:")]
    assert progress == ["promise-segment: segmenting: 1/2 slices (50%), " + progress[0].rsplit(", ", 1)[1],
                        "promise-segment: segmenting: 2/2 slices (100%), " + progress[1].rsplit(", ", 1)[1]]


def test_progress_lines_come_at_a_modest_rate(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "0.2")
    start = time.monotonic()
    with LineProgress("working", "step") as p:
        for n in range(1, 401):
            p(n, 400)
            time.sleep(0.002)
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.splitlines()
    assert 2 <= len(lines) <= elapsed / 0.2 + 2, (len(lines), elapsed)
    assert lines[-1].startswith("promise-segment: working: 400/400 steps (100%)")


def test_a_png_result_holds_the_one_slice_as_a_0_255_mask(tmp_path, capsys):
    from PIL import Image

    rgb = np.zeros((24, 32, 3), np.uint8)
    rgb[6:18, 8:24] = 200
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    rc, out, err = cli(capsys, "segment", tmp_path / "photo.png", "-o", tmp_path / "mask.png", "--box",
                       "8,6,0,23,17,0")  # the default backbone, LiteMedSAM: a real result
    assert rc == 0, err
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (24, 32) and set(np.unique(mask)) <= {0, 255} and mask.any()


def test_checkpoints_list_does_not_call_a_damaged_file_cached(tmp_path, capsys):
    from PromiseSegmentLib.paths import cache_dir

    cache_dir().mkdir(parents=True, exist_ok=True)
    (cache_dir() / "sam_vit_b_01ec64.pth").write_bytes(b"not the official weights" * 100)
    (cache_dir() / "medsam_vit_b.pth").write_bytes(b"user supplied")
    rc, out, err = cli(capsys, "checkpoints", "list")
    rows = {ln.split()[0]: ln for ln in out.splitlines()[1:]}
    assert rc == 0 and "damaged" in rows["sam_vit_b"] and "cached" not in rows["sam_vit_b"]
    assert "not downloaded" in rows["sam_vit_l"] and "unverified" in rows["medsam"] and "ready" in rows["lite_medsam"]
