"""One case of a cohort, start to finish: read, check, segment, write - with one model per process.

The same ``CaseSegmenter`` runs in the one-process cohort and in every Ray worker, so both give the same
outputs voxel for voxel. A case's failure (unreadable file, wrong geometry, out of memory, a bug) becomes
its row in ``results.csv``; it never stops the other cases. Outputs are written atomically, with the
run's key in the header.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.cohort.cases import CohortCase
from PromiseSegmentLib.cohort.results import RUN_ID_FIELD, RUN_KEY_FIELD, CaseRow, run_key
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.errors import Cancelled, PromiseError


@dataclass(frozen=True)
class CohortSettings:
    """What every case of a run shares: the model (backbone, adapter, engine) and the options that change
    the mask (mode, axis, slices, intensity rule, segment name)."""

    adapter: Optional[str] = None  # the run's adapter (a manifest row may name its own)
    backbone: Optional[str] = None  # None: each adapter's own
    allow_mismatch: bool = False
    device: Optional[str] = None
    precision: str = "auto"
    threads: Optional[int] = None
    runtime: Optional[str] = None
    mode: str = "auto"
    axis: Union[str, int] = "K"
    slices: Optional[Tuple[int, int]] = None
    intensity: Optional[IntensityRule] = None  # None: each adapter's own rule
    segment_name: Optional[str] = None  # None: the adapter's target name
    overwrite: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def engine_options(self) -> Dict[str, Any]:
        return {"precision": self.precision, "threads": self.threads, "runtime": self.runtime}


@dataclass(frozen=True)
class CaseTask:
    """A case with everything that decides its output: the adapter file and the run key."""

    case: CohortCase
    adapter: str
    adapter_sha256: str
    backbone_sha256: str
    key: str


def intensity_for(settings: CohortSettings, case: CohortCase) -> Optional[IntensityRule]:
    if case.window is not None:
        return IntensityRule.ct(*case.window)
    return settings.intensity


def case_task(settings: CohortSettings, case: CohortCase) -> CaseTask:
    """The case's adapter, the SHA-256 of it and of its backbone, and the run key - no model loaded."""
    from PromiseSegmentLib.backbones.checkpoints import file_sha256
    from PromiseSegmentLib.backbones.registry import expected_identity
    from PromiseSegmentLib.model.adapter_format import read_adapter_metadata

    adapter = case.adapter or settings.adapter
    if not adapter:
        raise PromiseError(f"{case.name}: no adapter (give --adapter, or an adapter column in the manifest)")
    meta = read_adapter_metadata(adapter)
    backbone = expected_identity(settings.backbone, meta.backbone)
    adapter_sha = file_sha256(Path(adapter))
    rule = intensity_for(settings, case)
    options = {
        "mode": settings.mode,
        "axis": settings.axis,
        "slices": list(settings.slices) if settings.slices else None,
        "intensity": rule.to_dict() if rule else None,
        "name": case.segment_name or settings.segment_name,
    }
    return CaseTask(case, adapter, adapter_sha, backbone, run_key(backbone, adapter_sha, options))


class CaseSegmenter:
    """Segments cases with the models of one process: the backbone is loaded once, each adapter once."""

    def __init__(self, settings: CohortSettings):
        self.settings = settings
        self.models: Dict[str, Any] = {}

    def model(self, adapter: str):
        if adapter not in self.models:
            from PromiseSegmentLib.model.promise import load_model

            s = self.settings
            self.models[adapter] = load_model(
                s.backbone, adapter, s.device, allow_mismatch=s.allow_mismatch, **s.engine_options()
            )
        return self.models[adapter]

    def run(
        self,
        task: CaseTask,
        volume=None,
        progress: Optional[ProgressFn] = None,
        cancel: Optional[CancelFn] = None,
        attempt: int = 1,
    ) -> CaseRow:
        """The case's row: done (its output written), or failed with the reason in one line. ``volume``: the
        case already read (``read_case``), or the exception reading it raised."""
        case, start = task.case, time.time()
        row = CaseRow(
            case.name,
            str(case.input),
            str(case.output),
            "failed",
            series_uid=case.series_uid or "",
            attempts=attempt,
            backbone_sha256=task.backbone_sha256,
            adapter_sha256=task.adapter_sha256,
            run_key=task.key,
        )
        try:
            if self.written_by_this_run(task):
                return replace(row, status="done", message="written by an earlier attempt of this run")
            if isinstance(volume, BaseException):
                raise volume
            vol = volume if volume is not None else read_case(case)
            mask = self._segment(task, vol, progress, cancel)
            row = replace(row, status="done", slices=int(mask.any(axis=(1, 2)).sum()), voxels=int(mask.sum()))
        except (KeyboardInterrupt, Cancelled):
            raise
        except Exception as exc:  # noqa: BLE001 - a case's failure is its row, never the cohort's end
            row = replace(row, message=failure_line(exc))
        return replace(row, seconds=time.time() - start)

    def written_by_this_run(self, task: CaseTask) -> bool:
        """An output this invocation already wrote (its worker died after the rename): never written twice."""
        from PromiseSegmentLib.data.volume_io import read_header_field

        out = task.case.output
        return (
            out.is_file()
            and read_header_field(out, RUN_ID_FIELD) == self.settings.run_id
            and read_header_field(out, RUN_KEY_FIELD) == task.key
        )

    def _segment(self, task: CaseTask, vol, progress, cancel) -> np.ndarray:
        from PromiseSegmentLib.data.preprocessing import resolve_axis
        from PromiseSegmentLib.data.volume_io import Segment, write_segmentation

        s, case = self.settings, task.case
        model = self.model(task.adapter)
        if model.backbone.identity != task.backbone_sha256:
            raise PromiseError(
                f"the backbone loaded ({model.backbone.identity[:12]}) is not the one planned "
                f"({task.backbone_sha256[:12]})"
            )
        axis = resolve_axis(s.axis, vol.ijk_to_ras)
        n = vol.array.shape[axis]
        if s.slices and s.slices[1] >= n:
            raise PromiseError(f"--slices {s.slices[0]}:{s.slices[1]} is outside the volume ({n} slices)")
        rule = intensity_for(s, case) or model.intensity
        mask = model.segment_volume(
            vol.array,
            vol.ijk_to_ras,
            axis=axis,
            slice_range=s.slices,
            intensity=rule,
            mode=s.mode,
            progress=progress,
            cancel=cancel,
        )
        segment = Segment(case.segment_name or s.segment_name or model.target_name, model.target_color)
        header = {RUN_KEY_FIELD: task.key, RUN_ID_FIELD: s.run_id}
        write_segmentation(case.output, mask, vol.ijk_to_ras, [segment], s.overwrite, header=header)
        return mask


def read_case(case: CohortCase):
    from PromiseSegmentLib.data.volume_io import read_volume

    return read_volume(case.input, "input", series_uid=case.series_uid)


def failure_line(exc: BaseException) -> str:
    """One line for results.csv: the user's problem as it is, anything else with its type."""
    text = " ".join(str(exc).split())
    if isinstance(exc, MemoryError):
        return f"out of memory ({text or 'MemoryError'})"
    if isinstance(exc, (PromiseError, OSError)):
        return text or type(exc).__name__
    if "out of memory" in text.lower():
        return f"out of memory: {text}"
    return f"internal error: {type(exc).__name__}: {text}"


def worker_name() -> str:
    return f"{os.uname().nodename}:{os.getpid()}"
