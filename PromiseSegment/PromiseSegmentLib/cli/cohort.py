"""The ``segment`` command over a cohort: many inputs, one model, ``results.csv``, resumable; on Ray with
``--cluster``. Exit status 0 when every case is done (or was done before), 3 when some failed, 2 for bad
arguments, 130 when interrupted (finished cases are kept; the same command continues)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from PromiseSegmentLib.cli.arg_types import cluster_arg, thread_count
from PromiseSegmentLib.cohort.run import CohortEvents
from PromiseSegmentLib.errors import Cancelled, InputError

EXIT_SOME_FAILED = 3
PROG = "promise-segment"


def add_cohort_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "cohorts",
        "many inputs in one run: one model load, results.csv in --out-dir, finished cases skipped when run "
        "again; exit status 3 when some cases failed",
    )
    g.add_argument(
        "--out-dir",
        metavar="DIR",
        help="output folder of a cohort: <name>.seg.nrrd per case (a folder's cases keep their relative "
        "paths; a DICOM folder's series are <folder>/<series>.seg.nrrd) and results.csv",
    )
    g.add_argument(
        "--manifest",
        metavar="CSV",
        help="cases as a CSV: input (required), output (relative to --out-dir), adapter, window, name",
    )
    g.add_argument(
        "--cluster",
        type=cluster_arg,
        metavar="ray|auto|ray://HOST:PORT",
        help='run the cohort on Ray (pip install "promise-segment[cluster]"): ray = the cluster in $RAY_ADDRESS '
        "or a new local one, auto = a running cluster, ray://HOST:PORT = a remote one",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=thread_count,
        metavar="N",
        help="CPU cores per Ray worker on a cluster without GPUs (default 2); with GPUs: one worker per GPU",
    )


class CohortLines(CohortEvents):
    """Progress as lines: one per finished case (stdout; failures on stderr) with the time left, and a bar
    inside each case."""

    def __init__(self):
        self.start = time.monotonic()
        self.ran = self.segmented = self.to_run = 0
        self.bar = None

    def planned(self, to_run: int, settled: int, total: int) -> None:
        self.to_run = to_run
        before = f"; {settled} need no work or cannot be done (see below)" if settled else ""
        print(f"{PROG}: cohort: {total} cases, {to_run} to segment{before}", flush=True)

    def started(self, task, worker: str) -> None:
        from PromiseSegmentLib.cli.arguments import progress_bar

        self.close_bar()
        self.bar = progress_bar(f"{task.case.name}", "slice")

    def slices(self, done: int, total: Optional[int]) -> None:
        if self.bar is not None:
            self.bar(done, total)

    def finished(self, row, done: int, total: int) -> None:
        self.close_bar()
        ran = row.status != "skipped" and row.attempts > 0
        self.ran += ran
        self.segmented += row.status == "done" and ran
        left = ""
        if ran and self.segmented and self.ran < self.to_run:  # from the cases segmented so far
            seconds = (time.monotonic() - self.start) / self.ran * (self.to_run - self.ran)
            left = f"; about {seconds / 60:.0f} min left" if seconds >= 90 else f"; about {seconds:.0f} s left"
        what = f"{row.slices} slices with foreground, {row.seconds:.1f} s" if row.status == "done" else row.message
        line = f"[{done}/{total}] {row.case}: {row.status}" + (f" ({what})" if what else "") + left
        print(line, file=sys.stderr if row.status == "failed" else sys.stdout, flush=True)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_cohort(args) -> int:
    from PromiseSegmentLib.cli.arguments import intensity_from_args
    from PromiseSegmentLib.cli.validation import preflight
    from PromiseSegmentLib.cohort.run import segment_cohort
    from PromiseSegmentLib.cohort.segmenter import CohortSettings

    if args.adapter_meta is not None and args.adapter_meta.apm is None:
        raise InputError(f"a cohort needs an adapter with an APM (automatic prompts); {args.adapter} has none")
    # on a cluster the workers' devices count, not this machine's
    device = None if args.cluster else args.device
    preflight(device, args.mode if args.adapter else None, args.adapter_meta, args.backbone)
    given = args.window or args.percentiles
    settings = CohortSettings(
        adapter=args.adapter,
        backbone=args.backbone,
        allow_mismatch=args.allow_backbone_mismatch,
        device=args.device,
        precision=args.precision,
        threads=args.threads,
        runtime=args.runtime,
        mode=args.mode,
        axis=args.axis,
        slices=args.slices,
        intensity=intensity_from_args(args) if given else None,
        segment_name=args.name,
        overwrite=args.overwrite,
    )
    lines, out = CohortLines(), Path(args.out_dir)
    try:
        result = segment_cohort(
            args.cases, out, settings, events=lines, cluster=args.cluster, cpus_per_worker=args.cpus_per_worker
        )
    except (KeyboardInterrupt, Cancelled):
        lines.close_bar()
        print(
            f"{PROG}: cancelled; the finished cases are written and recorded in {out / 'results.csv'}; "
            "run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    counts = result.table.counts()
    print(
        f"{PROG}: cohort finished in {result.seconds:.0f} s: {counts['done']} done, {counts['skipped']} skipped "
        f"(done before), {counts['failed']} failed; see {result.table.path}",
        flush=True,
    )
    return EXIT_SOME_FAILED if counts["failed"] else 0
