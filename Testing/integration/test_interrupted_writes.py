"""Reliability battery (issue 11), writes under failure: an interruption, a kill or a full disk never leaves
half a file at an output's name nor replaces a good one, and leaves no temporary file that a later run does not
remove; an interrupted training run resumes. The full disk is a real tmpfs (root only, skipped otherwise).
Writes are caught mid-way with ``paths.HOLD_ENV`` (the write is complete on disk, not yet renamed).
Top-level imports stay light: kill tests import this module in a subprocess to run one writer."""

import contextlib
import hashlib
import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from local_http import serve
from reliability_support import (  # noqa: F401  (fixtures are used by name)
    ROOT,
    TINY,
    TRAIN_FAST,
    _quiet_progress,
    _seg,
    cli,
    contents,
    files,
    interrupt_held_write,
    kill_held_write,
    make_adapter,
    no_model,
    one_error,
    save_folder,
    temps,
    ws,
)

from PromiseSegmentLib import atomic_write
from PromiseSegmentLib.cli.arguments import PROGRESS_ENV
from PromiseSegmentLib.cli.main import main


# ----------------------------------------------------- class 6: every writer under a full disk, Ctrl+C, kill
def _cases(n=3, size=32):
    from PromiseSegmentLib.data.datasets import Case

    rng = np.random.default_rng(n)
    return [
        Case(f"c{i}", rng.integers(0, 255, (size, size, 3), dtype=np.uint8), rng.random((size, size)) > 0.5)
        for i in range(n)
    ]


@lru_cache(maxsize=1)
def _tiny_engine():
    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.model.promise import engine_for

    return engine_for(load_backbone("tiny_random"), None, "cpu")


def _write_state(path, variant):
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.resume import save_state
    from PromiseSegmentLib.training.trainer import Trainer

    trainer = Trainer(
        _tiny_engine(),
        _cases(),
        [],
        TrainConfig(use_apm=False, epochs=1, seed=variant),
        Path(str(path)[: -len(".state.pt")]),
    )
    save_state(trainer, 0)


def _write_report(folder, variant):
    from PromiseSegmentLib.evaluation.report import CaseScore, write_report

    cases, rng = _cases(), np.random.default_rng(variant)
    rows = [CaseScore(c.id, rng.random(), rng.random(), 3.0, c.mask) for c in cases]
    write_report(rows, cases, Path(folder))


def _download(path, variant):
    from PromiseSegmentLib.backbones.checkpoints import download_file

    body = bytes([variant]) * 300_000
    download_file(f"{os.environ['RELIABILITY_SERVER']}/v{variant}", Path(path), hashlib.sha256(body).hexdigest())


WRITERS = {  # target name -> write(path, variant): each variant writes different, valid content
    "s.seg.nrrd": lambda p, v: __import__("PromiseSegmentLib.data.volume_io", fromlist=["x"]).write_segmentation(
        p,
        np.random.default_rng(v).integers(0, 2, (4, 64, 64)),
        np.eye(4),
        [__import__("PromiseSegmentLib.data.volume_io", fromlist=["x"]).Segment("x")],
        overwrite=True,
    ),
    "o.png": lambda p, v: __import__("PromiseSegmentLib.data.volume_io", fromlist=["x"]).save_png(
        p, np.random.default_rng(v).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    ),
    "a.safetensors": lambda p, v: make_adapter(p, v, _record()),
    "t.safetensors.state.pt": _write_state,
    "metrics.csv": lambda p, v: _write_report(Path(p).parent, v),
    "figure.png": lambda p, v: _write_report(Path(p).parent, v),
    "report.txt": lambda p, v: atomic_write.write_bytes_atomically(p, str(v).encode() * 100_000),
    "ck.pth": _download,
}


def _record():
    from PromiseSegmentLib.model.adapter_format import BackboneRecord

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
    with serve(_Bodies) as url:
        yield url


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
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True
    )
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
    from PromiseSegmentLib.errors import CheckpointError, WriteError

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
    code = (
        f"import sys; sys.path[:0] = [{str(Path(__file__).parent)!r}, {str(ROOT / 'Testing' / 'utils')!r}]; "
        f"import test_interrupted_writes as t; "
        f"t.write_target({name!r}, {str(tmp_path)!r}, 1)"
    )
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
def test_segment_on_a_full_disk_fails_in_one_line_and_keeps_the_old_result(small_disk, files, capsys):
    from PromiseSegmentLib.data.volume_io import Segment, write_segmentation

    out = write_segmentation(
        small_disk.path / "r.seg.nrrd", np.ones((4, 32, 32)), files["ijk_to_ras"], [Segment("good")]
    )
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
    rc, stdout, err = cli(
        capsys,
        "evaluate",
        "--data",
        files["data"],
        "--limit",
        "1",
        "--prompt",
        "gt-box",
        "--out",
        disk.path / "ev",
        *TINY,
    )
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
    kill_held_write([sys.executable, "-m", "PromiseSegmentLib.cli.main", *argv], tmp_path, out.name)
    assert not out.exists() and len(temps(tmp_path)) == 1
    rc, stdout, err = cli(capsys, *argv)
    assert rc == 0 and out.is_file() and not temps(tmp_path), err


def test_sigterm_is_handled_like_ctrl_c(tmp_path, files):
    out = tmp_path / "r.seg.nrrd"
    rc, err = kill_held_write(
        [sys.executable, "-m", "PromiseSegmentLib.cli", *map(str, _seg(files, out))],
        tmp_path,
        out.name,
        sig=signal.SIGTERM,
    )
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
    square = np.zeros((32, 32), bool)
    square[8:20, 10:24] = True  # a real target: all-ones masks are refused before the counts are compared
    more = save_folder(tmp_path / "more", [(np.zeros((32, 32, 3), np.uint8), square)] * 6)
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
    from PromiseSegmentLib.model.adapter import read_metadata

    folder, out, argv = _copy_run(interrupted, tmp_path)
    rc, stdout, err = cli(capsys, *argv, "--resume")
    assert rc == 0 and f"wrote {out}" in stdout, err
    assert not Path(f"{out}.state.pt").exists() and not temps(folder)
    assert read_metadata(out).training["epochs"] == 2
