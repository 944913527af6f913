"""A cohort on a Ray cluster: actors hold the model, cases are tasks on them, dead workers are replaced.

One actor per GPU (when the cluster has GPUs and the device allows CUDA), else one per ``cpus_per_worker``
CPU cores; each loads the backbone once (``CaseSegmenter``), reads its cases from and writes its outputs
to the shared file system, atomically. The driver keeps the queue and ``results.csv``. A case whose
worker process died (killed, out of memory, node lost) is retried on a fresh actor, up to ``attempts``
times; a retried case finds an output its dead attempt completed (the run id in the header) and never
writes it twice. Ray is imported only here, and only when a cluster is asked for.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import replace
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple

from PromiseSegmentLib.callbacks import CancelFn
from PromiseSegmentLib.cohort.results import CaseRow
from PromiseSegmentLib.cohort.segmenter import CaseSegmenter, CaseTask, CohortSettings, worker_name
from PromiseSegmentLib.errors import Cancelled, InputError

log = logging.getLogger(__name__)
INSTALL_HINT = 'pip install "promise-segment[cluster]"'
DEFAULT_CPUS_PER_WORKER = 2


def import_ray():
    try:
        import ray
    except ImportError:
        raise InputError(f"--cluster needs Ray: {INSTALL_HINT}") from None
    return ray


class CaseWorker:
    """The actor: one ``CaseSegmenter`` (models loaded at the first case) in one worker process."""

    def __init__(self, settings: CohortSettings):
        self.segmenter = CaseSegmenter(settings)

    def where(self) -> str:
        return worker_name()

    def run(self, task: CaseTask, attempt: int) -> CaseRow:
        return self.segmenter.run(task, attempt=attempt)


def connect(ray, cluster: str) -> None:
    """ "ray": the cluster this process is connected to, else ``$RAY_ADDRESS``'s, else a new local one;
    "auto": a running cluster; "ray://HOST:PORT": a remote one through Ray Client."""
    if ray.is_initialized():
        return
    address = None if cluster == "ray" else cluster
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as exc:
        raise InputError(f"--cluster {cluster}: {exc}") from None


def worker_shape(ray, settings: CohortSettings, cpus_per_worker: Optional[int], cases: int) -> Tuple[int, dict]:
    """(number of actors, their Ray resource options): one per GPU, else one per ``cpus_per_worker`` cores."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and (settings.device or "auto").startswith(("auto", "cuda")):
        return min(gpus, cases), {"num_gpus": 1, "num_cpus": cpus_per_worker or 1}
    cpus = cpus_per_worker or DEFAULT_CPUS_PER_WORKER
    return max(1, min(int(resources.get("CPU", 1) // cpus), cases)), {"num_cpus": cpus}


def run_on_ray(
    tasks: Sequence[CaseTask],
    settings: CohortSettings,
    record: Callable[[CaseRow], None],
    events,
    cancel: Optional[CancelFn],
    cluster: str,
    cpus_per_worker: Optional[int],
    attempts: int,
) -> None:
    ray = import_ray()
    connect(ray, cluster)
    count, options = worker_shape(ray, settings, cpus_per_worker, len(tasks))
    if "num_gpus" not in options and settings.threads is None:
        settings = replace(settings, threads=options["num_cpus"])
    actor_class = ray.remote(max_restarts=0, max_task_retries=0, **options)(CaseWorker)
    pool = _Pool(ray, lambda: actor_class.remote(settings), count)
    queue: Deque[Tuple[CaseTask, int]] = deque((t, 1) for t in tasks)
    running: Dict[Any, Tuple[CaseTask, int, Any]] = {}
    died = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
    try:
        while queue or running:
            if cancel is not None and cancel():
                raise Cancelled()
            while pool.idle and queue:
                task, attempt = queue.popleft()
                actor = pool.idle.pop()
                running[actor.run.remote(task, attempt)] = (task, attempt, actor)
                events.started(task, pool.names[actor])
            ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
            for ref in ready:
                task, attempt, actor = running.pop(ref)
                try:
                    row = ray.get(ref)
                except died as exc:
                    pool.replace(actor)
                    if attempt < attempts:
                        log.warning("%s: its worker died (%s); retrying", task.case.name, type(exc).__name__)
                        queue.appendleft((task, attempt + 1))
                        continue
                    row = _failed(task, attempt, f"its worker died {attempt} times (last: {type(exc).__name__})")
                except ray.exceptions.RayTaskError as exc:  # the case's code raised past its own handling
                    pool.idle.append(actor)
                    row = _failed(task, attempt, f"internal error: {' '.join(str(exc).split())[:300]}")
                else:
                    pool.idle.append(actor)
                record(row)
    finally:
        pool.close()


class _Pool:
    """The actors, which are idle, and their process names (host:pid)."""

    def __init__(self, ray, make, count: int):
        self.ray, self.make = ray, make
        self.all: List[Any] = []  # Ray actor handles
        self.idle: List[Any] = []
        self.names: Dict[Any, str] = {}
        for _ in range(count):
            self._add()

    def _add(self) -> None:
        actor = self.make()
        self.names[actor] = self.ray.get(actor.where.remote())
        self.all.append(actor)
        self.idle.append(actor)

    def replace(self, dead) -> None:
        self.ray.kill(dead)
        self._add()

    def close(self) -> None:
        for actor in self.all:
            self.ray.kill(actor)


def _failed(task: CaseTask, attempt: int, message: str) -> CaseRow:
    case = task.case
    return CaseRow(
        case.name,
        str(case.input),
        str(case.output),
        "failed",
        message,
        case.series_uid or "",
        attempts=attempt,
        backbone_sha256=task.backbone_sha256,
        adapter_sha256=task.adapter_sha256,
        run_key=task.key,
    )
