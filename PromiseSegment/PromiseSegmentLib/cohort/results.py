"""``results.csv``: one row per case - what happened, how long it took, and what made the output.

Rewritten atomically after every case, so an interrupted or crashed run leaves a table of exactly the cases
that finished. The ``run_key`` (a digest of the backbone's and adapter's SHA-256 and the options that
change the mask) is also written into each ``.seg.nrrd`` header: a re-run skips a case whose output carries
the same key, and a case retried after its worker died finds an output its first attempt completed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Dict, List

from PromiseSegmentLib.atomic_write import write_bytes_atomically

RESULTS_NAME = "results.csv"
RUN_KEY_FIELD = "PromiseSegment_run_key"  # in the output's NRRD header
RUN_ID_FIELD = "PromiseSegment_run_id"  # which invocation wrote it (a retry never rewrites its own output)
STATUSES = ("done", "skipped", "failed")


@dataclass
class CaseRow:
    case: str
    input: str
    output: str
    status: str  # done, skipped or failed
    message: str = ""
    series_uid: str = ""
    slices: int = 0
    voxels: int = 0
    seconds: float = 0.0
    attempts: int = 1
    backbone_sha256: str = ""
    adapter_sha256: str = ""
    run_key: str = ""

    @staticmethod
    def from_csv(row: Dict[str, str]) -> "CaseRow":
        kinds = {f.name: f.type for f in fields(CaseRow)}
        values: Dict[str, Any] = {}
        for name, kind in kinds.items():
            text = row.get(name, "")
            values[name] = int(text or 0) if kind == "int" else float(text or 0) if kind == "float" else text
        return CaseRow(**values)


def run_key(backbone_sha256: str, adapter_sha256: str, options: Dict[str, Any]) -> str:
    """What made an output, as 16 hex digits: same key, same mask (up to the engine's float rounding)."""
    text = json.dumps({"backbone": backbone_sha256, "adapter": adapter_sha256, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultsTable:
    """The rows of ``folder/results.csv``, by case, kept in the order cases were first seen."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / RESULTS_NAME
        self.rows: Dict[str, CaseRow] = {}
        self.previous: Dict[str, CaseRow] = {}
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as f:
                self.previous = {r["case"]: CaseRow.from_csv(r) for r in csv.DictReader(f) if r.get("case")}

    def done_before(self, case: str, key: str, output: Path) -> bool:
        """Whether an earlier run recorded this case done with this key, and its output is still there."""
        row = self.previous.get(case)
        return bool(row and row.status in ("done", "skipped") and row.run_key == key and output.is_file())

    def record(self, row: CaseRow) -> None:
        self.rows[row.case] = row
        self.write()

    def write(self) -> Path:
        """Every case of this run, then the earlier run's cases this one did not touch (nothing is lost)."""
        merged = {**self.previous, **self.rows}
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, [f.name for f in fields(CaseRow)], lineterminator="\n")
        writer.writeheader()
        for row in merged.values():
            data = asdict(row)
            data["seconds"] = f"{row.seconds:.2f}"
            writer.writerow(data)
        return write_bytes_atomically(self.path, buffer.getvalue().encode("utf-8"), overwrite=True)

    def counts(self) -> Dict[str, int]:
        return {s: sum(r.status == s for r in self.rows.values()) for s in STATUSES}

    def failed(self) -> List[CaseRow]:
        return [r for r in self.rows.values() if r.status == "failed"]
