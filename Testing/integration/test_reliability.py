"""Reliability battery (issue 11), bad input: a user's mistake is one line on stderr and exit status 2, before any
model work, with every existing output intact; damaged adapters and volumes are refused naming the file; no
wrong result is reported. The real command line runs in-process (``main``) or, for timing, in a subprocess, on
the seeded tiny backbone (``--backbone tiny_random``). Failures while writing: ``test_interrupted_writes.py``."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reliability_support import (  # noqa: F401  (fixtures are used by name)
    PKG,
    TINY,
    TRAIN_FAST,
    _quiet_progress,
    _seg,
    argv_for,
    cli,
    contents,
    files,
    no_model,
    one_error,
    temps,
    write_nrrd,
    ws,
)

from PromiseSegmentLib.cli.arguments import PROGRESS_ENV, LineProgress

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
    "cache-features-with-augment": (TRAIN, ["--augment", "--cache-features"], "--no-augment"),
    "augmented-copies-without-cache": (TRAIN, ["--no-cache-features", "--augmented-copies", "2"], "--cache-features"),
    "augmented-copies-too-many": (
        TRAIN,
        ["--no-augment", "--cache-features", "--augmented-copies", "99"],
        "--augmented-copies must be 0..16",
    ),
    "nothing-to-train": (TRAIN, ["--no-apm", "--no-ips"], "nothing to train"),
    "label-with-data": (TRAIN, ["--label", "2"], "--label"),
    "volumes-without-labelmap": (
        ["train", "--volumes", "{vol}", "-o", "{old_adapter}", "--overwrite", *TINY],
        [],
        "IMAGE,LABELMAP",
    ),
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
    "overlay-exists": (["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--overlay", "{oldpng}", *NEW], "already exists"),
    "overlay-not-png": (
        ["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--overlay", "{tmp}/o.jpg", *NEW],
        "unknown output type",
    ),
    "output-unknown-extension": (["segment", "{vol}", "-o", "{tmp}/x.xyz", *NEW], "unknown output type (.xyz)"),
    "output-no-extension": (["segment", "{vol}", "-o", "{tmp}/result", *NEW], "no extension"),
    "output-is-a-folder": (["segment", "{vol}", "-o", "{tmp}/dir.seg.nrrd", *NEW], "is a folder"),
    "output-under-a-file": (["segment", "{vol}", "-o", "{old}/x.seg.nrrd", *NEW], "is a file"),
    "output-is-the-input": (["segment", "{vol}", "-o", "{vol}", "--overwrite", *NEW], "same file"),
    "overlay-is-the-output": (["segment", "{vol}", "-o", "{tmp}/a.png", "--overlay", "{tmp}/a.png", *NEW], "same file"),
    "adapter-missing": (
        ["segment", "{vol}", "-o", "{tmp}/n.seg.nrrd", "--adapter", "{tmp}/no.safetensors", *NEW],
        "does not exist",
    ),
    "train-output-exists": (["train", "--data", "{data}", "-o", "{old_adapter}", *TINY], "already exists"),
    "train-output-not-safetensors": (["train", "--data", "{data}", "-o", "{tmp}/a.pt", *TINY], "unknown output type"),
    "train-data-without-masks": (["train", "--data", "{tmp}/nomask", "-o", "{tmp}/a.safetensors", *TINY], "masks/"),
    "train-labelmap-missing": (
        ["train", "--volumes", "{vol},{tmp}/none.nrrd", "-o", "{tmp}/a.safetensors", *TINY],
        "label map",
    ),
    "resume-without-state": (
        ["train", "--data", "{data}", "-o", "{tmp}/a.safetensors", "--resume", *TINY],
        "nothing to resume",
    ),
    "state-without-resume": (["train", "--data", "{data}", "-o", "{tmp}/fresh.safetensors", *TINY], "interrupted run"),
    "evaluate-metrics-exist": (
        ["evaluate", "--data", "{data}", "--out", "{ev}", "--prompt", "gt-box", *TINY],
        "already exists",
    ),
    "evaluate-out-is-a-file": (
        ["evaluate", "--data", "{data}", "--out", "{old}", "--prompt", "gt-box", *TINY],
        "is a file",
    ),
    "evaluate-split-missing": (
        ["evaluate", "--data", "{data}", "--split", "val", "--out", "{tmp}/e", *TINY],
        "does not exist",
    ),
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
    "not-safetensors": (
        lambda path, meta, good: Path(path).write_bytes(b"junk" * 50) and path,
        "not a readable adapter",
    ),
}


@pytest.mark.parametrize("case", list(ADAPTER_DAMAGE))
def test_damaged_adapters_are_refused_naming_the_file(case, ws, files, capsys, no_model):
    from PromiseSegmentLib.model.adapter import read_metadata

    make, phrase = ADAPTER_DAMAGE[case]
    bad = make(ws["tmp"] / f"{case}.safetensors", read_metadata(files["adapter"]).to_json(), files["adapter"])
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
    rc, out, err = cli(
        capsys, "segment", files["vol"], "-o", ws["tmp"] / "x.seg.nrrd", "--adapter", bad, "--point", "16,16,1", *TINY
    )
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

    from PromiseSegmentLib.data.volume_io import read_volume

    rgb = np.arange(27, dtype=np.uint8).reshape(3, 3, 3) * 9
    Image.fromarray(rgb).save(ws["tmp"] / "rgb.png")
    vol = read_volume(ws["tmp"] / "rgb.png")
    assert vol.array.shape == (1, 3, 3, 3)
    np.testing.assert_array_equal(vol.array[0], rgb)
    rc, out, err = cli(
        capsys, "segment", ws["tmp"] / "rgb.png", "-o", ws["tmp"] / "x.seg.nrrd", "--point", "1,1,2", *TINY
    )
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
    code = (
        "import sys; from PromiseSegmentLib.cli.main import main; "
        f"sys.exit(main(['segment', {str(path)!r}, '-o', {str(tmp_path / 'x.seg.nrrd')!r}, '--point', '1,1,0']))"
    )
    r = subprocess.run(
        prefix + [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(PKG)),
        timeout=120,
    )
    line = one_error(r.returncode, r.stderr, "cannot be read", "permission denied")
    assert "does not exist" not in line


def test_training_on_empty_masks_is_refused_before_the_backbone(ws, files, capsys, no_model):
    rc, out, err = cli(capsys, "train", "--data", files["empty"], "-o", ws["tmp"] / "a.safetensors", *TINY, *TRAIN_FAST)
    one_error(rc, err, "every training mask is empty")
    assert not (ws["tmp"] / "a.safetensors").exists()


def test_too_few_training_images_are_refused(ws, files, capsys, no_model):
    rc, out, err = cli(
        capsys, "train", "--data", files["data"], "-o", ws["tmp"] / "a.safetensors", *TINY, *TRAIN_FAST, "--limit", "1"
    )
    one_error(rc, err, "no training cases")


def test_the_training_configuration_needs_no_torch():
    """The command line checks training options before torch loads: the configuration module must import,
    build and check a ``TrainConfig`` with torch unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from PromiseSegmentLib.training.config import TRAIN_DEFAULTS, TrainConfig\n"
        "TrainConfig().check(); assert TRAIN_DEFAULTS['epochs'] == TrainConfig().epochs\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ class 5: argument errors come fast
TIMED = {
    "epochs-0": OPTION_ERRORS["epochs-0"][:2],
    "device-meta": OPTION_ERRORS["device-meta"][:2],
    "slices-letters": OPTION_ERRORS["slices-letters"][:2],
    "positive-over-points": OPTION_ERRORS["positive-over-points"][:2],
    "output-exists": (PATH_ERRORS["output-exists"][0], []),
    "train-output-exists": (PATH_ERRORS["train-output-exists"][0], []),
    "evaluate-metrics-exist": (PATH_ERRORS["evaluate-metrics-exist"][0], []),
    "overlay-exists": (PATH_ERRORS["overlay-exists"][0], []),
}


@pytest.mark.parametrize("case", list(TIMED))
def test_argument_errors_come_in_under_a_second_without_torch(case, ws):
    base, extra = TIMED[case]
    code = (
        "import json, sys, time; t = time.perf_counter(); from PromiseSegmentLib.cli.main import main\n"
        f"try:\n    rc = main({argv_for(base + extra, ws)!r})\nexcept SystemExit as e:\n    rc = e.code\n"
        "print(json.dumps([rc, time.perf_counter() - t, 'torch' in sys.modules]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(PKG)),
    )
    rc, seconds, torch_imported = json.loads(r.stdout.strip().splitlines()[-1])
    one_error(rc, r.stderr)
    assert not torch_imported and seconds < 1.0, (seconds, torch_imported)


# ---------------------------------------------------------------------- class 9: no wrong result reported
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels_are_ignored_by_the_intensity_rule(bad, files):
    from PromiseSegmentLib.data.preprocessing import IntensityRule, to_uint8_rgb

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
    from PromiseSegmentLib.data.volume_io import read_labelmap

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


def test_the_slice_count_is_along_the_chosen_axis_and_progress_lines_appear_in_logs(
    tmp_path, files, capsys, monkeypatch
):
    from PromiseSegmentLib.data.volume_io import read_labelmap

    monkeypatch.setenv(PROGRESS_ENV, "0")  # every update: stderr is not a terminal here
    out = tmp_path / "i.seg.nrrd"
    rc, stdout, err = cli(
        capsys, "segment", files["vol"], "-o", out, "--axis", "2", "--point", "16,16,1", "--point", "17,14,2", *TINY
    )
    assert rc == 0, err
    mask = read_labelmap(out).array
    along_i = int(mask.any(axis=(0, 1)).sum())
    reported = int(re.search(r"on (\d+) slices along I", stdout)[1])
    assert reported == along_i and 1 <= along_i <= 2 and mask.any(axis=(1, 2)).sum() > along_i
    progress = [ln for ln in err.splitlines() if ln.startswith("promise-segment: segmenting:")]
    assert len(progress) == 2, progress
    assert re.fullmatch(r"promise-segment: segmenting: 1/2 slices \(50%\), \d+ s, about \d+ s left", progress[0])
    assert re.fullmatch(r"promise-segment: segmenting: 2/2 slices \(100%\), \d+ s", progress[1])


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
    rc, out, err = cli(
        capsys, "segment", tmp_path / "photo.png", "-o", tmp_path / "mask.png", "--box", "8,6,0,23,17,0"
    )  # the default backbone, LiteMedSAM: a real result
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
