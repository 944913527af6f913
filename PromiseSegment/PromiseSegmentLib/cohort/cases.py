"""The cases of a cohort and the output each one gets.

Inputs are volume files, folders (searched to any depth, in name order), glob patterns, or a manifest.
A folder holding DICOM files is a study: each of its series is one case. The naming rule, under the
output folder ``out``:

- a file given by itself: ``out/<name>.seg.nrrd`` (``<name>``: the file name without its suffix);
- a case found inside a folder given: the same relative path under ``out``, e.g. ``scans/p1/ct.nii.gz``
  -> ``out/p1/ct.seg.nrrd``; a DICOM folder with one series -> ``out/<relative folder>.seg.nrrd``;
- a DICOM folder with several series -> ``out/<relative folder>/<series>.seg.nrrd``, ``<series>`` being
  the SeriesDescription where it tells the series apart, else the SeriesInstanceUID;
- a manifest row: its ``output`` column (relative to ``out``), else the rule above.

Two cases with one output name are refused before any work, naming both: never one overwriting another.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from PromiseSegmentLib.errors import InputError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
OUTPUT_SUFFIX = ".seg.nrrd"
MANIFEST_COLUMNS = ("input", "output", "adapter", "window", "name")


@dataclass(frozen=True)
class CohortCase:
    """One volume to segment: where it is, where its segmentation goes, and its own options (manifest)."""

    name: str  # the output's path under the output folder, without the suffix: the case's name in results.csv
    input: Path
    output: Path
    series_uid: Optional[str] = None  # the series of a DICOM folder that holds several
    adapter: Optional[str] = None  # this case's adapter file (manifest), else the run's
    window: Optional[Tuple[float, float]] = None  # this case's CT window (center, width), else the run's
    segment_name: Optional[str] = None  # this case's segment name, else the run's


def volume_stem(path: Path) -> Optional[str]:
    """The file name without its volume suffix; None when it is no volume file (or is a segmentation)."""
    lower = path.name.lower()
    if lower.endswith(OUTPUT_SUFFIX):
        return None
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def find_cases(inputs: Sequence[str], out: Path) -> List[CohortCase]:
    """The cases of files, folders and glob patterns, with their outputs under ``out`` (naming rule above)."""
    cases: List[CohortCase] = []
    for text in inputs:
        paths = [Path(p) for p in sorted(glob.glob(os.path.expanduser(text), recursive=True))] if _is_glob(text) else []
        if _is_glob(text) and not paths:
            raise InputError(f"{text} matches no file or folder")
        for path in paths or [Path(text).expanduser()]:
            cases.extend(_cases_of(path, out))
    check_unique(cases)
    return cases


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[") and not Path(text).expanduser().exists()


def _cases_of(path: Path, out: Path) -> List[CohortCase]:
    if not path.exists():
        raise InputError(f"input {path} does not exist")
    if path.is_file():
        stem = volume_stem(path) or path.name.split(".")[0] or path.name
        return [CohortCase(stem, path, out / (stem + OUTPUT_SUFFIX))]
    found = _dicom_cases(path, path.name, out)
    if found:
        return found
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        here = Path(folder)
        relative = here.relative_to(path)
        if here != path:
            series = _dicom_cases(here, str(relative), out)
            if series:
                found.extend(series)
                subfolders[:] = []
                continue
        for file_name in sorted(files):
            found_stem = volume_stem(here / file_name)
            if found_stem and not file_name.startswith("."):
                label = str(relative / found_stem) if str(relative) != "." else found_stem
                found.append(CohortCase(label, here / file_name, out / (label + OUTPUT_SUFFIX)))
    if not found:
        raise InputError(f"{path} holds no volume files ({', '.join(VOLUME_SUFFIXES)}) and no DICOM series")
    return found


def _dicom_cases(folder: Path, label: str, out: Path) -> List[CohortCase]:
    """The DICOM series directly in ``folder``: one case each (none: an empty list)."""
    if not any(f.is_file() and volume_stem(f) is None for f in folder.iterdir()):
        return []
    from PromiseSegmentLib.data.dicom_series import list_series

    series = list_series(folder)
    if len(series) == 1:
        return [CohortCase(label, folder, out / (label + OUTPUT_SUFFIX), series[0].uid)]
    descriptions = [_safe(s.description) for s in series]
    telling = all(descriptions) and len(set(descriptions)) == len(descriptions)
    cases = []
    for s, description in zip(series, descriptions):
        name = f"{label}/{description if telling else _safe(s.uid)}"
        cases.append(CohortCase(name, folder, out / (name + OUTPUT_SUFFIX), s.uid))
    return cases


def _safe(text: str) -> str:
    """A series description or UID as a file name: letters, digits, '.', '-' and '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")


def read_manifest(path: Path, out: Path) -> List[CohortCase]:
    """A CSV with a header row: ``input`` (required; relative to the manifest's folder), ``output`` (relative
    to ``out``; default: the naming rule), ``adapter``, ``window`` (CENTER,WIDTH) and ``name`` (optional)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
        if "input" not in columns or unknown:
            raise InputError(
                f"manifest {path}: columns must include 'input' and be among {', '.join(MANIFEST_COLUMNS)}"
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    cases: List[CohortCase] = []
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        if not row.get("input"):
            raise InputError(f"manifest {path} line {number}: the input is empty")
        source = Path(os.path.expanduser(row["input"]))
        source = source if source.is_absolute() else path.parent / source
        found = _cases_of(source, out)
        if row.get("output"):
            if len(found) > 1:
                raise InputError(
                    f"manifest {path} line {number}: {source} holds {len(found)} cases but names one output"
                )
            name = row["output"][: -len(OUTPUT_SUFFIX)] if row["output"].endswith(OUTPUT_SUFFIX) else row["output"]
            found = [CohortCase(name, found[0].input, out / (name + OUTPUT_SUFFIX), found[0].series_uid)]
        options = _row_options(path, number, row)
        cases.extend(CohortCase(c.name, c.input, c.output, c.series_uid, **options) for c in found)
    check_unique(cases)
    return cases


def _row_options(path: Path, number: int, row: Dict[str, str]) -> dict:
    options: dict = {"adapter": row.get("adapter") or None, "segment_name": row.get("name") or None}
    if options["adapter"] and not Path(options["adapter"]).is_absolute():
        options["adapter"] = str(path.parent / options["adapter"])
    if row.get("window"):
        try:
            center, width = (float(v) for v in row["window"].split(","))
        except ValueError:
            raise InputError(f"manifest {path} line {number}: window {row['window']!r} is not CENTER,WIDTH") from None
        if not (math.isfinite(center) and math.isfinite(width) and width > 0):
            raise InputError(f"manifest {path} line {number}: window {row['window']!r} needs a positive width")
        options["window"] = (center, width)
    return options


def check_unique(cases: Sequence[CohortCase]) -> None:
    """Refuse two cases with one output (or one input given twice): nothing would tell them apart."""
    seen: Dict[str, CohortCase] = {}
    for case in cases:
        key = os.path.normcase(os.path.abspath(case.output))
        if key in seen:
            other = seen[key]
            raise InputError(
                f"{other.input} and {case.input} would both be written to {case.output}; "
                "rename one, or name the outputs in a --manifest"
            )
        seen[key] = case
    if not cases:
        raise InputError("no cases to segment")
