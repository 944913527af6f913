"""A cohort in one process, through the command line: every case gets a row in results.csv, a failing
case never stops the others, a second run skips what is done, --overwrite redoes it, Ctrl+C keeps the
finished cases, and the output names follow the documented rule."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from cohort_files import write_volume
from dicom_files import write_series

from PromiseSegmentLib.cli.main import main
from PromiseSegmentLib.cohort.cases import find_cases, read_manifest
from PromiseSegmentLib.cohort.results import RUN_KEY_FIELD
from PromiseSegmentLib.data.volume_io import read_header_field, read_volume
from PromiseSegmentLib.errors import InputError

LIB = Path(__file__).resolve().parents[2] / "PromiseSegment"
EXPECTED = {
    "corrupt": "failed",
    "fourd": "failed",
    "good1": "done",
    "good2": "done",
    "good3": "failed",  # its output exists and was made otherwise
    "study/Arterial": "done",
    "study/Venous": "done",
}


def rows(out):
    with open(out / "results.csv", newline="") as f:
        return {r["case"]: r for r in csv.DictReader(f)}


def segment(*args):
    try:
        return main(["segment", *map(str, args), "--device", "cpu", "--runtime", "torch"])
    except SystemExit as exc:  # argparse's own usage errors
        return exc.code


def test_cases_get_outputs_by_the_naming_rule_and_a_clash_is_refused(tmp_path):
    scans, out = tmp_path / "scans", tmp_path / "out"
    (scans / "p1").mkdir(parents=True)
    for name in ("a.nii.gz", "p1/ct.nrrd", "p1/notes.txt", "old.seg.nrrd"):
        (scans / name).write_bytes(b"x")
    write_series(scans / "p2" / "dicom", [0.0, 1.0], uid="1.2.3", prefix="a")
    write_series(scans / "p2" / "dicom", [0.0, 1.0], uid="1.2.4", prefix="b")
    cases = find_cases([str(scans)], out)
    assert {c.name: c.output.relative_to(out).as_posix() for c in cases} == {
        "a": "a.seg.nrrd",
        "p1/ct": "p1/ct.seg.nrrd",
        "p2/dicom/1.2.3": "p2/dicom/1.2.3.seg.nrrd",  # no SeriesDescription: the SeriesInstanceUID names it
        "p2/dicom/1.2.4": "p2/dicom/1.2.4.seg.nrrd",
    }
    assert {c.series_uid for c in cases if c.name.startswith("p2")} == {"1.2.3", "1.2.4"}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.nrrd").write_bytes(b"x")
    with pytest.raises(InputError, match="would both be written to .*a.seg.nrrd"):
        find_cases([str(scans / "a.nii.gz"), str(tmp_path / "other" / "a.nrrd")], out)
    assert [c.name for c in find_cases([str(scans / "p1" / "*.nrrd")], out)] == ["ct"]  # a glob, quoted


def test_a_manifest_names_outputs_and_options_per_row_and_refuses_bad_rows(tmp_path):
    (tmp_path / "a.nrrd").write_bytes(b"x")
    manifest = tmp_path / "m.csv"
    manifest.write_text("input,output,window,name\na.nrrd,first/liver,40,400,Liver\n".replace("40,400", '"40,400"'))
    (case,) = read_manifest(manifest, tmp_path / "out")
    assert case.output == tmp_path / "out" / "first" / "liver.seg.nrrd"
    assert case.window == (40.0, 400.0) and case.segment_name == "Liver"
    manifest.write_text('input,window\na.nrrd,"40,-1"\n')
    with pytest.raises(InputError, match="line 2: window .* positive width"):
        read_manifest(manifest, tmp_path / "out")
    manifest.write_text("input,colour\na.nrrd,red\n")
    with pytest.raises(InputError, match="unknown: colour"):
        read_manifest(manifest, tmp_path / "out")


@pytest.mark.slow
def test_a_cohort_records_every_case_skips_what_is_done_and_overwrite_redoes_it(cohort, ct_adapter, capsys):
    scans, out = cohort
    before = (out / "good3.seg.nrrd").read_bytes()
    assert segment(scans, "--out-dir", out, "--adapter", ct_adapter) == 3  # some cases failed
    first = rows(out)
    assert {case: r["status"] for case, r in first.items()} == EXPECTED
    assert "cannot read" in first["corrupt"]["message"] and "4D" in first["fourd"]["message"]
    assert "exists" in first["good3"]["message"] and (out / "good3.seg.nrrd").read_bytes() == before
    for case in ("good1", "study/Venous"):
        written = out / f"{case}.seg.nrrd"
        assert read_header_field(written, RUN_KEY_FIELD) == first[case]["run_key"]
        assert int(first[case]["voxels"]) == int(np.count_nonzero(read_volume(written, labels=True).array))
    source = read_volume(scans / "good1.nrrd")
    assert np.allclose(read_volume(out / "good1.seg.nrrd", labels=True).ijk_to_ras, source.ijk_to_ras)
    assert len({r["adapter_sha256"] for r in first.values() if r["status"] == "done"}) == 1
    assert "[7/7]" in capsys.readouterr().out

    assert segment(scans, "--out-dir", out, "--adapter", ct_adapter) == 3
    second = rows(out)
    assert {c for c, r in second.items() if r["status"] == "skipped"} == {c for c, s in EXPECTED.items() if s == "done"}
    mtime = (out / "good1.seg.nrrd").stat().st_mtime_ns

    assert segment(scans, "--out-dir", out, "--adapter", ct_adapter, "--window", "40,400") == 3  # other options
    assert rows(out)["good1"]["status"] == "failed" and (out / "good1.seg.nrrd").stat().st_mtime_ns == mtime

    assert segment(scans, "--out-dir", out, "--adapter", ct_adapter, "--overwrite") == 3  # only corrupt, fourd
    third = rows(out)
    assert {c for c, r in third.items() if r["status"] == "failed"} == {"corrupt", "fourd"}
    assert (out / "good1.seg.nrrd").stat().st_mtime_ns != mtime and third["good3"]["status"] == "done"
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_cohort_arguments_are_refused_before_any_model_is_loaded(tmp_path, capsys):
    write_volume(tmp_path / "a.nrrd", np.zeros((2, 8, 8), np.uint8))
    for args, message in [
        ([tmp_path / "a.nrrd", tmp_path / "a.nrrd"], "need --out-dir"),
        ([tmp_path / "a.nrrd", "--out-dir", tmp_path / "o"], "give --adapter"),
        ([tmp_path / "a.nrrd", "--out-dir", tmp_path / "o", "-o", tmp_path / "x.seg.nrrd"], "-o apply to one input"),
        ([tmp_path / "a.nrrd", "--out-dir", tmp_path / "o", "--cluster", "slurm"], "expected ray, auto or ray://"),
    ]:
        assert segment(*args) == 2
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_ctrl_c_halfway_keeps_the_finished_cases_and_the_same_command_continues(cohort, ct_adapter, tmp_path):
    scans, out = cohort
    for name in ("corrupt.nii.gz", "fourd.nii.gz", "good3.nrrd"):
        (scans / name).unlink()
    command = [sys.executable, "-m", "PromiseSegmentLib.cli", "segment", str(scans), "--out-dir", str(out)]
    command += ["--adapter", str(ct_adapter), "--device", "cpu", "--runtime", "torch"]
    env = dict(os.environ, PYTHONPATH=str(LIB))
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # the first case is finished: interrupt the second
        if line.startswith("[1/"):
            process.send_signal(signal.SIGINT)
            break
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "run the same command again" in err
    kept = rows(out)
    assert 1 <= len(kept) < 4 and all(r["status"] == "done" for r in kept.values())
    written = {p.relative_to(out).as_posix()[: -len(".seg.nrrd")] for p in out.rglob("*.seg.nrrd")}
    assert written - {"good3"} == set(kept)  # nothing partial, nothing unrecorded
    assert not [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert segment(scans, "--out-dir", out, "--adapter", ct_adapter) == 0
    again = rows(out)
    assert {c for c, r in again.items() if r["status"] == "skipped"} == set(kept) and len(again) == 4


def test_a_retried_case_finds_the_output_its_dead_attempt_completed(cohort, ct_adapter, tmp_path):
    """A worker that died after writing: the retry reports the case done and never writes it twice."""
    from PromiseSegmentLib.cohort.cases import CohortCase
    from PromiseSegmentLib.cohort.results import RUN_ID_FIELD
    from PromiseSegmentLib.cohort.segmenter import CaseSegmenter, CohortSettings, case_task
    from PromiseSegmentLib.data.volume_io import Segment, write_segmentation

    scans, out = cohort
    settings = CohortSettings(adapter=str(ct_adapter), device="cpu", runtime="torch")
    task = case_task(settings, CohortCase("good1", scans / "good1.nrrd", out / "good1.seg.nrrd"))
    header = {RUN_KEY_FIELD: task.key, RUN_ID_FIELD: settings.run_id}
    write_segmentation(task.case.output, np.zeros((3, 128, 128)), np.eye(4), [Segment("x")], header=header)
    mtime = task.case.output.stat().st_mtime_ns
    row = CaseSegmenter(settings).run(task, attempt=2)
    assert row.status == "done" and "earlier attempt" in row.message and row.attempts == 2
    assert task.case.output.stat().st_mtime_ns == mtime
    other_run = CohortSettings(adapter=str(ct_adapter), device="cpu", runtime="torch")  # another invocation
    assert CaseSegmenter(other_run).run(task).status == "failed"  # it exists: never replaced unasked
    assert sitk.ReadImage(str(task.case.output)).GetSize() == (128, 128, 3)
