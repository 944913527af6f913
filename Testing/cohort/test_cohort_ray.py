"""The same cohort on a real local Ray cluster (2 single-CPU workers started by the test), with one worker
killed by PID mid-case: that case is retried and finished, every case is once in results.csv, nothing
partial is left, and the outputs equal the one-process run's voxel for voxel."""

import csv
import os
import signal
import threading

import numpy as np
import pytest
import ray

from PromiseSegmentLib.cohort.cases import find_cases
from PromiseSegmentLib.cohort.run import CohortEvents, segment_cohort
from PromiseSegmentLib.cohort.segmenter import CohortSettings
from PromiseSegmentLib.data.volume_io import read_volume

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    cache = tmp_path_factory.mktemp("ray-cache")
    env = {"PROMISE_SEGMENT_CACHE": str(cache), "PROMISE_SEGMENT_RUNTIME": "torch", "OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


def settings_for(adapter):
    return CohortSettings(adapter=str(adapter), device="cpu", runtime="torch", threads=1)


def results(out):
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def masks(out):
    return {p.relative_to(out).as_posix(): read_volume(p, labels=True).array for p in sorted(out.rglob("*.seg.nrrd"))}


class KillWorkerOf(CohortEvents):
    """Kills (SIGKILL) the worker process that got ``case``, half a second after it got it (its first volume:
    the model loads, then 3 slices are segmented - seconds)."""

    def __init__(self, case):
        self.killed, self.done = case, False

    def started(self, task, worker):
        if task.case.name == self.killed and not self.done:
            self.done = True
            pid = int(worker.rsplit(":", 1)[1])
            threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()


def test_a_cohort_on_ray_with_a_worker_killed_mid_case_writes_what_one_process_writes(
    local_ray, cohort, ct_adapter, tmp_path
):
    scans, out = cohort
    (out / "good3.seg.nrrd").unlink()
    here, there = tmp_path / "here", tmp_path / "there"
    segment_cohort(find_cases([str(scans)], here), here, settings_for(ct_adapter))
    events = KillWorkerOf("good1")
    segment_cohort(find_cases([str(scans)], there), there, settings_for(ct_adapter), events=events, cluster="ray")
    rows = {r["case"]: r for r in results(there)}
    assert len(results(there)) == len(rows) == 7  # every case exactly once
    assert {c: r["status"] for c, r in rows.items()} == {r["case"]: r["status"] for r in results(here)}
    assert sorted(r["status"] for r in rows.values()) == ["done"] * 5 + ["failed"] * 2
    assert rows["good1"]["attempts"] == "2" and rows["good1"]["status"] == "done"
    expected, found = masks(here), masks(there)
    assert expected.keys() == found.keys() and len(found) == 5
    assert any(m.any() for m in found.values())  # not a comparison of empty masks
    assert all(np.array_equal(expected[k], found[k]) for k in expected)
    assert not [p for p in there.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]  # nothing partial
