"""Reliability of outputs (review items 5, 7, 8, 10, and hostile output paths): two runs never both "win" one
output; the outputs of one command are written all or none; an empty ground truth is scored, never a failure;
output names are checked (temporary name included) before any model work; odd output paths are refused in one
line or written where the user meant, never somewhere else and never over data. Real files, real processes, the
real command line (in-process, or in a subprocess where two runs race); a full disk is a real tmpfs (root only).
Writes are caught mid-way with ``paths.HOLD_ENV`` (complete on disk, not yet renamed; removing the marker
releases the hold)."""

import contextlib
import csv
import math
import os
import shutil
import stat
import subprocess
import sys
import threading
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
    held_write,
    no_model,
    one_error,
    save_folder,
    temps,
    ws,
)
from test_interrupted_writes import mounted_tmpfs

from PromiseSegmentLib.paths import HOLD_ENV

EVAL = ["evaluate", "--prompt", "gt-box", *TINY]


# ------------------------------------------------------------------------------------------------ helpers
def segment_name(path):
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader.GetMetaData("Segment0_Name")


@contextlib.contextmanager
def meanwhile(folder, name, action, nth=1):
    """Run ``action()`` while the ``nth`` write of ``name`` is held (complete, not yet renamed), then release
    the hold: another program acting between a run's checks and its rename."""
    done = []
    with held_write(folder, name, nth, seconds=15) as marker:

        def watch():
            deadline = time.monotonic() + 120
            while not marker.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            if marker.exists():
                action()
                done.append(True)
                marker.unlink(missing_ok=True)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            yield done
        finally:
            thread.join(timeout=130)


def rows_of(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def png_bytes(value=7):
    from PromiseSegmentLib.data.volume_io import save_png

    tmp = Path(f"/tmp/psg-test-{os.getpid()}-{value}.png")
    save_png(tmp, np.full((8, 8, 3), value, np.uint8))
    data = tmp.read_bytes()
    tmp.unlink()
    return data


@pytest.fixture
def disk(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "8m") as d:
        yield d


# ------------------------------------------------------------ item 5: two runs writing one output, one wins
def test_two_processes_racing_for_one_output_one_wins_the_other_says_so(tmp_path, files):
    out = tmp_path / "r.seg.nrrd"
    runs = {}
    for name in ("first", "second"):  # both held with their result complete, each released by the test
        marker = tmp_path / f"{name}.marker"
        env = dict(
            os.environ,
            PYTHONPATH=str(PKG),
            **{HOLD_ENV: out.name, HOLD_ENV + "_MARKER": str(marker), HOLD_ENV + "_SECONDS": "60"},
        )
        argv = [sys.executable, "-m", "PromiseSegmentLib.cli.main", *map(str, _seg(files, out, "--name", name))]
        runs[name] = (
            marker,
            subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        )
    deadline = time.monotonic() + 180
    while not all(m.exists() for m, _ in runs.values()) and time.monotonic() < deadline:
        assert all(p.poll() is None for _, p in runs.values()), "a run ended before both were writing"
        time.sleep(0.05)
    results = {}
    for name, (marker, proc) in runs.items():  # "first" renames first, then "second" tries
        marker.unlink()
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = (proc.returncode, stdout, stderr)
    assert results["first"][0] == 0 and f"wrote {out}" in results["first"][1], results["first"][2]
    rc, stdout, stderr = results["second"]
    one_error(rc, stderr, str(out), "appeared while this run was writing", "nothing was replaced")
    assert "wrote" not in stdout and segment_name(out) == "first" and not temps(tmp_path)


def test_a_file_put_at_the_adapter_name_during_training_is_never_replaced(tmp_path, files, capsys):
    out, other = tmp_path / "a.safetensors", tmp_path / "other.bytes"
    other.write_bytes(b"another program's file" * 100)
    # the 2nd save of the adapter (final, after the best-so-far one): someone else's file is there by then
    with meanwhile(tmp_path, out.name, lambda: os.replace(other, out), nth=2) as done:
        rc, stdout, err = cli(capsys, "train", "--data", files["data"], "-o", out, *TINY, *TRAIN_FAST)
    assert done
    one_error(rc, err, str(out), "appeared while this run was writing", "nothing was replaced")
    assert out.read_bytes() == b"another program's file" * 100 and not temps(tmp_path)


def test_the_exclusive_rename_without_hard_links_also_refuses_a_file_that_appeared(tmp_path):
    """The fallback for file systems without hard links (none mountable here): a placeholder takes the name."""
    from PromiseSegmentLib import atomic_write

    tmp, target = tmp_path / ".t.tmp", tmp_path / "t.csv"
    tmp.write_text("ours")
    atomic_write._rename_via_placeholder(str(tmp), target)
    assert target.read_text() == "ours" and not tmp.exists()
    tmp.write_text("late")
    with pytest.raises(FileExistsError):
        atomic_write._rename_via_placeholder(str(tmp), target)
    assert target.read_text() == "ours" and tmp.read_text() == "late"


# -------------------------------------------------------------- item 7: evaluate writes both files or none
def test_evaluate_on_a_nearly_full_disk_writes_neither_file_and_the_rerun_works(disk, files, capsys):
    out = disk.path / "ev"
    disk.fill(leave=8192)  # room for metrics.csv, not for figure.png
    argv = [*EVAL, "--data", files["data"], "--out", out]
    rc, stdout, err = cli(capsys, *argv)
    one_error(rc, err, "no space left", "figure.png")
    assert not out.exists() and not temps(disk.path), "a failed run left files (or its new folder) behind"
    (disk.path / ".filler").unlink()
    rc, stdout, err = cli(capsys, *argv)  # the same command, nothing in its way
    assert rc == 0 and (out / "metrics.csv").is_file() and (out / "figure.png").is_file(), err


def test_evaluate_overwrite_on_a_nearly_full_disk_keeps_both_old_files(disk, files, capsys):
    out = disk.path / "ev"
    out.mkdir()
    (out / "metrics.csv").write_text("id,dice\nold,1\n")
    (out / "figure.png").write_bytes(png_bytes())
    before = contents([out / "metrics.csv", out / "figure.png"])
    disk.fill(leave=8192)
    rc, stdout, err = cli(capsys, *EVAL, "--data", files["data"], "--out", out, "--overwrite")
    one_error(rc, err, "no space left", "figure.png")
    assert contents([out / "metrics.csv", out / "figure.png"]) == before and not temps(out)


def test_evaluate_rolls_back_metrics_when_its_figure_name_was_taken_meanwhile(tmp_path, files, capsys):
    out = tmp_path / "ev"
    theirs = png_bytes(9)
    with meanwhile(out, "figure.png", lambda: (out / "figure.png").write_bytes(theirs)) as done:
        rc, stdout, err = cli(capsys, *EVAL, "--data", files["data"], "--out", out)
    assert done
    one_error(rc, err, "figure.png", "appeared while this run was writing", "nothing was replaced")
    assert not (out / "metrics.csv").exists() and (out / "figure.png").read_bytes() == theirs and not temps(out)


def test_evaluate_overwrite_restores_the_old_metrics_when_the_figure_cannot_be_renamed(tmp_path, files, capsys):
    out = tmp_path / "ev"
    out.mkdir()
    (out / "metrics.csv").write_text("id,dice\nold,1\n")
    (out / "figure.png").write_bytes(png_bytes())

    def figure_becomes_a_folder():
        (out / "figure.png").unlink()
        (out / "figure.png").mkdir()

    with meanwhile(out, "figure.png", figure_becomes_a_folder) as done:
        rc, stdout, err = cli(capsys, *EVAL, "--data", files["data"], "--out", out, "--overwrite")
    assert done
    one_error(rc, err, "figure.png")
    assert (out / "metrics.csv").read_text() == "id,dice\nold,1\n" and (out / "figure.png").is_dir()
    assert not temps(out)


# ------------------------------------------------------------------ item 8: an empty ground truth is scored
@pytest.fixture(scope="module")
def one_empty(files, tmp_path_factory):
    """Three cases, the middle one (c1) with an empty ground-truth mask."""
    from PromiseSegmentLib.data.volume_io import read_mask, read_rgb

    data = files["data"]
    pairs = [(read_rgb(data / "images" / f"c{n}.png"), read_mask(data / "masks" / f"c{n}.png")) for n in range(3)]
    pairs[1] = (pairs[1][0], np.zeros_like(pairs[1][1]))
    return save_folder(tmp_path_factory.mktemp("one-empty"), pairs)


def test_evaluate_gt_box_scores_an_empty_ground_truth_and_every_other_case(one_empty, tmp_path, capsys):
    rc, stdout, err = cli(capsys, *EVAL, "--data", one_empty, "--out", tmp_path / "ev")
    assert rc == 0, err
    rows = {r["id"]: r for r in rows_of(tmp_path / "ev" / "metrics.csv")}
    assert list(rows) == ["c0", "c1", "c2"]
    empty = rows["c1"]  # no box to give: nothing predicted, which is right for an empty truth
    assert (empty["dice"], empty["iou"], empty["hd95_px"]) == ("1.0000", "1.0000", "nan")
    assert empty["note"].startswith("no box (empty ground truth)")
    for r in (rows["c0"], rows["c2"]):
        assert 0 <= float(r["dice"]) <= 1 and r["note"] == ""
    assert "cases 3" in stdout


def test_an_empty_ground_truth_with_point_prompts_is_scored_and_noted(one_empty, tmp_path, capsys):
    rc, stdout, err = cli(
        capsys, *EVAL[:1], "--prompt", "gt-points", *TINY, "--data", one_empty, "--out", tmp_path / "ev"
    )
    assert rc == 0, err
    empty = rows_of(tmp_path / "ev" / "metrics.csv")[1]
    assert empty["id"] == "c1" and empty["note"].startswith("empty ground truth")
    assert empty["dice"] in ("1.0000", "0.0000") and empty["hd95_px"] in ("nan", "inf")


def test_metrics_conventions_for_empty_masks():
    from PromiseSegmentLib.evaluation.metrics import dice, hd95, iou

    empty, some = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    some[2:5, 2:5] = True
    assert dice(empty, empty) == iou(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(some, empty) == iou(some, empty) == 0.0 == dice(empty, some)
    assert math.isnan(hd95(empty, empty))  # no surface on either side: undefined
    assert hd95(some, empty) == hd95(empty, some) == math.inf


# --------------------------------------------------------------- item 10: output names checked up front
@pytest.mark.parametrize(
    "suffix, magic",
    [(".NII", None), (".NII.GZ", b"\x1f\x8b"), (".NRRD", b"NRRD"), (".SEG.NRRD", b"NRRD"), (".Seg.Nrrd", b"NRRD")],
)
def test_upper_case_extensions_are_written_in_their_format(suffix, magic, tmp_path, files, capsys):
    from PromiseSegmentLib.data.volume_io import read_labelmap

    lower = tmp_path / f"lower{suffix.lower()}"
    upper = tmp_path / f"upper{suffix}"
    for out in (lower, upper):
        rc, stdout, err = cli(capsys, *_seg(files, out))
        assert rc == 0 and f"wrote {out}" in stdout, err
    data = upper.read_bytes()
    if magic is None:  # uncompressed NIfTI-1: "n+1" at byte 344
        assert data[344:347] == b"n+1"
    else:
        assert data.startswith(magic)
    np.testing.assert_array_equal(read_labelmap(upper).array, read_labelmap(lower).array)
    assert not temps(tmp_path)


@pytest.mark.parametrize(
    "name",
    [
        "a" * 238 + ".seg.nrrd",  # 247 characters: its temporary name is longer
        "b" * 246 + ".seg.nrrd",  # 255: the longest legal name
        "é" * 120 + ".seg.nrrd",
    ],
)  # 249 bytes in 129 characters
def test_a_long_legal_output_name_is_written(name, tmp_path, files, capsys):
    out = tmp_path / name
    rc, stdout, err = cli(capsys, *_seg(files, out))
    assert rc == 0 and out.is_file() and not temps(tmp_path), err


# ------------------------------------------------- hostile outputs refused in one line before any model work
@pytest.fixture
def hostile(ws, files):
    """``ws`` plus odd things at output names: a device node, symlinks (loop, dangling, to the input), FIFOs, a
    read-only folder (a read-only tmpfs as root, mode 555 otherwise)."""
    tmp = ws["tmp"]
    if os.geteuid() == 0:
        os.mknod(tmp / "null.nrrd", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # what /dev/null is
    (tmp / "loop").symlink_to(tmp / "loop")
    (tmp / "gone").symlink_to(tmp / "no-such-folder")
    (tmp / "dangling.seg.nrrd").symlink_to(tmp / "no-such-file")
    (tmp / "link.nrrd").symlink_to(files["vol"])
    (tmp / "fifoev").mkdir()
    os.mkfifo(tmp / "fifoev" / "metrics.csv")
    os.mkfifo(tmp / "x.safetensors")
    ro = tmp / "ro"
    ro.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        ro.chmod(0o555)
    ws = dict(ws, ro=ro)
    yield ws
    if mounted:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


S = ["segment", "{vol}", "--point", "16,16,1", *TINY, "-o"]
E = ["evaluate", "--data", "{data}", "--prompt", "gt-box", *TINY, "--out"]
REFUSED = {  # case: (argv, phrases in the one error line)                             expected behaviour
    "output-trailing-slash": (S + ["{tmp}/new.seg.nrrd/"], "ends with '/'"),  # a folder was meant: no file
    "output-fifo-overwrite": (S + ["{tmp}/fifo.nrrd", "--overwrite"], "not a regular file"),  # never replaced
    "output-device-overwrite": (S + ["{tmp}/null.nrrd", "--overwrite"], "not a regular file"),  # /dev/null-like
    "output-newline-in-name": (S + ["{tmp}/a\nb.seg.nrrd"], "control character"),  # a pasted line break
    "output-empty": (S + [""], "is empty"),  # an unset shell variable
    "output-mixed-case-nii": (S + ["{tmp}/x.Nii"], "mixed case"),  # ITK writes it, then cannot read it
    "output-mixed-case-nii-gz": (S + ["{tmp}/x.NII.gz"], "mixed case"),
    "output-name-too-long": (S + ["{tmp}/" + "d" * 247 + ".seg.nrrd"], "too long", "output (-o)"),  # 256 bytes
    "output-under-symlink-loop": (S + ["{tmp}/loop/x.seg.nrrd"], "symbolic link"),  # not after the model
    "output-under-dangling-link": (S + ["{tmp}/gone/x.seg.nrrd"], "symbolic link"),  # not after the model
    "output-dotdot-after-missing": (S + ["{tmp}/missing/../x.seg.nrrd"], "does not exist"),  # like cp/mv
    "output-read-only-folder": (S + ["{ro}/x.seg.nrrd"], "not writable"),
    "output-dangling-symlink": (S + ["{tmp}/dangling.seg.nrrd"], "already exists"),  # a link is a file
    "output-symlink-to-input": (S + ["{tmp}/link.nrrd", "--overwrite"], "same file"),  # the input is kept
    "overlay-is-output-via-dotdot": (S + ["{tmp}/a.png", "--overlay", "{tmp}/ev/../a.png"], "same file"),
    "train-output-fifo-overwrite": (
        ["train", "--data", "{data}", "-o", "{tmp}/x.safetensors", "--overwrite", *TINY],
        "not a regular file",
    ),
    "evaluate-out-empty": (E + [""], "is empty"),  # would write into the current folder
    "evaluate-out-newline": (E + ["{tmp}/e\nv"], "control character"),
    "evaluate-out-in-the-images": (E + ["{data}/images"], "inside --data"),  # figure.png would be a new image
    "evaluate-out-in-the-masks": (E + ["{data}/masks/"], "inside --data"),
    "evaluate-csv-fifo-overwrite": (E + ["{tmp}/fifoev", "--overwrite"], "not a regular file"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_hostile_outputs_are_refused_in_one_line_before_any_model(case, hostile, capsys, no_model):
    argv, *phrases = REFUSED[case]
    if "null.nrrd" in str(argv) and not (hostile["tmp"] / "null.nrrd").exists():
        pytest.skip("making a device node needs root")
    before = contents(hostile["intact"])
    listing = sorted(os.listdir(hostile["tmp"]))
    rc, out, err = cli(capsys, *argv_for(argv, hostile))
    one_error(rc, err, *phrases)
    assert contents(hostile["intact"]) == before and sorted(os.listdir(hostile["tmp"])) == listing
    assert stat.S_ISFIFO(os.stat(hostile["tmp"] / "fifo.nrrd").st_mode) and not temps(hostile["tmp"])


# ----------------------------------------------------------- hostile outputs that are written where meant
def _tilde(ws, files, capsys, monkeypatch):  # "~" quoted, so the shell left it: $HOME, never ./~
    home, work = ws["tmp"] / "home", ws["tmp"] / "work"
    home.mkdir(), work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    rc, out, err = cli(capsys, *_seg(files, "~/t.seg.nrrd"))
    assert rc == 0 and (home / "t.seg.nrrd").is_file() and not os.listdir(work), err


def _dotdot(ws, files, capsys, monkeypatch):  # through an existing folder: where the kernel says
    rc, out, err = cli(capsys, *_seg(files, ws["tmp"] / "ev" / ".." / "rel.seg.nrrd"))
    assert rc == 0 and (ws["tmp"] / "rel.seg.nrrd").is_file(), err


def _symlink_to_other(ws, files, capsys, monkeypatch):  # --overwrite replaces the link, never its target
    link = ws["tmp"] / "l.seg.nrrd"
    link.symlink_to(ws["old"])
    before = contents([ws["old"]])
    rc, out, err = cli(capsys, *_seg(files, link, "--overwrite"))
    assert rc == 0 and not link.is_symlink() and link.is_file() and contents([ws["old"]]) == before, err


def _hard_link_of_input(ws, files, capsys, monkeypatch):  # the input keeps its bytes
    vol = Path(shutil.copy(files["vol"], ws["tmp"] / "in.nrrd"))
    os.link(vol, ws["tmp"] / "hl.nrrd")
    before = contents([vol])
    rc, out, err = cli(capsys, "segment", vol, "-o", ws["tmp"] / "hl.nrrd", "--overwrite", "--point", "16,16,1", *TINY)
    assert rc == 0 and contents([vol]) == before and os.stat(vol).st_nlink == 1, err


def _read_only_old_output(ws, files, capsys, monkeypatch):  # --overwrite asked for it: replaced
    ws["old"].chmod(0o444)
    before = contents([ws["old"]])
    rc, out, err = cli(capsys, *_seg(files, ws["old"], "--overwrite"))
    assert rc == 0 and contents([ws["old"]]) != before, err


def _stale_temps(ws, files, capsys, monkeypatch):  # a crashed run's temporary removed, a live one's kept
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    stale, live = (
        ws["tmp"] / f".n.seg.nrrd.psg{dead.pid}.abcd1234.nrrd",
        ws["tmp"] / f".n.seg.nrrd.psg{os.getppid()}.abcd1234.nrrd",
    )
    stale.write_bytes(b"half"), live.write_bytes(b"busy")
    rc, out, err = cli(capsys, *_seg(files, ws["tmp"] / "n.seg.nrrd"))
    assert rc == 0 and not stale.exists() and live.read_bytes() == b"busy", err
    live.unlink()


def _folder_vanishes(ws, files, capsys, monkeypatch):  # one line, nothing reported as written
    sub = ws["tmp"] / "sub"
    # the hold's marker lies outside ``sub``: removing it with ``sub`` would end the hold mid-rmtree, and the
    # run's own clean-up of the folder it made would race the rmtree
    with meanwhile(ws["tmp"], "v.seg.nrrd", lambda: shutil.rmtree(sub)) as done:
        rc, out, err = cli(capsys, *_seg(files, sub / "v.seg.nrrd"))
    assert done
    one_error(rc, err, "could not write", str(sub / "v.seg.nrrd"))
    assert "wrote" not in out and not sub.exists()


def _new_folders_on_a_full_disk(ws, files, capsys, monkeypatch):  # a failed run leaves no new empty folders
    with mounted_tmpfs(ws["tmp"] / "full", "1m") as d:
        d.fill()
        rc, out, err = cli(capsys, *_seg(files, d.path / "new" / "deeper" / "x.seg.nrrd"))
        one_error(rc, err, "no space left")
        assert not (d.path / "new").exists()


def _evaluate_out_trailing_slash(ws, files, capsys, monkeypatch):  # a folder named with its slash: fine
    rc, out, err = cli(capsys, *EVAL, "--data", files["data"], "--out", f"{ws['tmp']}/evs/")
    assert rc == 0 and (ws["tmp"] / "evs" / "metrics.csv").is_file(), err


def _evaluate_outputs_linked(ws, files, capsys, monkeypatch):  # figure.png -> metrics.csv: two real files after
    (ws["ev"] / "figure.png").unlink()
    (ws["ev"] / "figure.png").symlink_to(ws["ev"] / "metrics.csv")
    rc, out, err = cli(capsys, *EVAL, "--data", files["data"], "--out", ws["ev"], "--overwrite")
    assert rc == 0 and not (ws["ev"] / "figure.png").is_symlink(), err
    assert (ws["ev"] / "metrics.csv").read_text().startswith("id,dice") and (
        ws["ev"] / "figure.png"
    ).read_bytes().startswith(b"\x89PNG")


WRITTEN = {
    "tilde-not-expanded-by-the-shell": _tilde,
    "dotdot-through-an-existing-folder": _dotdot,
    "symlink-to-another-file-overwrite": _symlink_to_other,
    "hard-link-of-the-input": _hard_link_of_input,
    "read-only-old-output-overwrite": _read_only_old_output,
    "stale-temporaries": _stale_temps,
    "folder-vanishes-mid-write": _folder_vanishes,
    "new-folders-full-disk": _new_folders_on_a_full_disk,
    "evaluate-out-trailing-slash": _evaluate_out_trailing_slash,
    "evaluate-outputs-linked": _evaluate_outputs_linked,
}


@pytest.mark.parametrize("case", list(WRITTEN))
def test_hostile_outputs_are_written_where_meant_or_fail_cleanly(case, ws, files, capsys, monkeypatch):
    WRITTEN[case](ws, files, capsys, monkeypatch)
    assert not temps(ws["tmp"])
