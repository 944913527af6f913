"""A cohort run: plan (what is done already, what cannot be written), then segment the rest in this
process - reading the next volume while the current one is segmented - or on a Ray cluster.

Each case's row goes into ``results.csv`` as soon as it finishes. An interruption (Ctrl+C, ``cancel``)
stops at once: the case in progress writes nothing, every finished case stays written and recorded, and
running the same command again continues where it stopped.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PromiseSegmentLib.callbacks import CancelFn
from PromiseSegmentLib.cohort.cases import CohortCase
from PromiseSegmentLib.cohort.results import RUN_KEY_FIELD, CaseRow, ResultsTable
from PromiseSegmentLib.cohort.segmenter import (
    CaseSegmenter,
    CaseTask,
    CohortSettings,
    case_task,
    failure_line,
    read_case,
    worker_name,
)
from PromiseSegmentLib.errors import Cancelled


class CohortEvents:
    """What a cohort run reports; override what you show (the command line prints lines, Slicer a bar)."""

    def planned(self, to_run: int, settled: int, total: int) -> None:
        """``settled`` cases need no work (done before) or cannot be done (their row says why)."""

    def started(self, task: CaseTask, worker: str) -> None:
        pass

    def slices(self, done: int, total: Optional[int]) -> None:
        """Slices inside the current case (one-process runs)."""

    def finished(self, row: CaseRow, done: int, total: int) -> None:
        pass


@dataclass
class CohortResult:
    table: ResultsTable
    seconds: float

    @property
    def failed(self) -> List[CaseRow]:
        return self.table.failed()


def plan(
    cases: Sequence[CohortCase], settings: CohortSettings, table: ResultsTable
) -> Tuple[List[CaseTask], List[CaseRow]]:
    """The cases to segment, and the rows of those that need no work: skipped (their output was made by
    the same adapter and options) or failed (their adapter cannot be read, or an output made otherwise is
    in the way and ``overwrite`` is off)."""
    from PromiseSegmentLib.data.volume_io import read_header_field

    tasks, settled = [], []
    for case in cases:
        base = CaseRow(case.name, str(case.input), str(case.output), "failed", series_uid=case.series_uid or "")
        try:
            task = case_task(settings, case)
        except Exception as exc:  # noqa: BLE001 - this case's row
            settled.append(_with(base, message=failure_line(exc), attempts=0))
            continue
        known = _with(base, backbone_sha256=task.backbone_sha256, adapter_sha256=task.adapter_sha256, run_key=task.key)
        if case.output.exists() and not settings.overwrite:
            if read_header_field(case.output, RUN_KEY_FIELD) == task.key or table.done_before(
                case.name, task.key, case.output
            ):
                settled.append(_with(known, status="skipped", message="done before with this adapter and options"))
            else:
                message = f"{case.output} exists and was made otherwise; --overwrite replaces it"
                settled.append(_with(known, message=message, attempts=0))
            continue
        tasks.append(task)
    return tasks, settled


def _with(row: CaseRow, **changes) -> CaseRow:
    from dataclasses import replace

    return replace(row, **changes)


def segment_cohort(
    cases: Sequence[CohortCase],
    out_dir: Path,
    settings: CohortSettings,
    *,
    events: Optional[CohortEvents] = None,
    cancel: Optional[CancelFn] = None,
    cluster: Optional[str] = None,
    cpus_per_worker: Optional[int] = None,
    attempts: int = 3,
    segmenter: Optional[CaseSegmenter] = None,
) -> CohortResult:
    """Segment ``cases``; ``results.csv`` in ``out_dir``. ``cluster``: None (this process), "ray" (a local
    Ray cluster, or the one this process is connected to), "auto" (a running cluster) or "ray://HOST:PORT".
    ``segmenter``: one holding models already loaded (the Slicer module's). Raises ``Cancelled`` or
    ``KeyboardInterrupt`` when interrupted, after recording every finished case."""
    start, events = time.time(), events or CohortEvents()
    table = ResultsTable(out_dir)
    tasks, settled = plan(cases, settings, table)
    events.planned(len(tasks), len(settled), len(cases))
    done = 0
    for row in settled:
        done += 1
        table.record(row)
        events.finished(row, done, len(cases))

    def record(row: CaseRow) -> None:
        nonlocal done
        done += 1
        table.record(row)
        events.finished(row, done, len(cases))

    if tasks and cluster:
        from PromiseSegmentLib.cohort.ray_cluster import run_on_ray

        run_on_ray(tasks, settings, record, events, cancel, cluster, cpus_per_worker, attempts)
    elif tasks:
        run_here(tasks, segmenter or CaseSegmenter(settings), record, events, cancel)
    return CohortResult(table, time.time() - start)


def run_here(tasks: Sequence[CaseTask], segmenter: CaseSegmenter, record, events: CohortEvents, cancel) -> None:
    """Case after case with one model; the next volume is read on a thread while this one is segmented
    (two volumes in memory at most)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cohort-read")
    try:
        upcoming: Optional[Future] = pool.submit(_read, tasks[0].case)
        for n, task in enumerate(tasks):
            if cancel is not None and cancel():
                raise Cancelled()
            assert upcoming is not None
            volume = upcoming.result()
            upcoming = pool.submit(_read, tasks[n + 1].case) if n + 1 < len(tasks) else None
            events.started(task, worker_name())
            record(segmenter.run(task, volume, events.slices, cancel))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _read(case: CohortCase):
    """The volume, or the exception reading it raised (it becomes the case's row, not the run's end)."""
    try:
        return read_case(case)
    except Exception as exc:  # noqa: BLE001
        return exc
