"""Evaluate a model on image+mask cases: per-case Dice/IoU/HD95, a CSV, a summary table and a figure.

A case with an empty ground truth is scored like any other, by the convention in ``metrics`` (Dice 1.0 only
if nothing is predicted; HD95 NaN or inf), and its CSV row says so in the ``note`` column."""

from __future__ import annotations

import csv
import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from PromiseSegmentLib.atomic_write import Output, bytes_output, write_all
from PromiseSegmentLib.callbacks import ProgressFn
from PromiseSegmentLib.data.datasets import Case, sample_points
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.evaluation.metrics import dice, hd95, iou

EMPTY_TRUTH = "empty ground truth: Dice and IoU 1 only if nothing is predicted; HD95 nan if so, else inf"
NO_BOX = "no box (empty ground truth): nothing predicted, which is right; HD95 nan"


@dataclass(frozen=True)
class CaseScore:
    """One case's scores and prediction; ``note`` says when the empty-mask convention decided them."""

    id: str
    dice: float
    iou: float
    hd95: float
    prediction: np.ndarray
    note: str = ""


@dataclass(frozen=True)
class Summary:
    cases: int
    dice_mean: float
    dice_std: float
    dice_median: float
    iou_mean: float
    hd95_median: float  # over the cases where it is defined
    hd95_undefined: int  # empty prediction or truth
    empty_truth: int


def simulated_prompts(case: Case, prompt: str) -> Prompts:
    if prompt == "center":
        h, w = case.mask.shape
        return Prompts(points=np.array([[w / 2, h / 2]]), labels=np.array([1]))
    if prompt == "gt-points":
        pts, labels = sample_points(case.mask, 3, 3, np.random.default_rng(zlib.crc32(case.id.encode())))
        return Prompts(points=pts, labels=labels)
    if prompt == "gt-box":
        return Prompts(box=mask_box(case.mask))
    return Prompts()


def predict_case(model, case: Case, mode: str, prompt: str) -> Tuple[np.ndarray, str]:
    """(predicted mask, note for the CSV). With ``gt-box`` an empty ground truth has no box to give: the
    simulated user gives none and nothing is predicted (never a failure of the whole evaluation)."""
    note = "" if case.mask.any() else EMPTY_TRUTH
    if note and prompt == "gt-box":
        return np.zeros(case.mask.shape, bool), NO_BOX
    emb = model.engine.encode([case.rgb])[0]
    return model.predict(emb, simulated_prompts(case, prompt), mode=mode).masks[0], note


def evaluate_cases(
    model, cases: List[Case], mode: str = "auto", prompt: str = "none", progress: Optional[ProgressFn] = None
) -> List[CaseScore]:
    rows = []
    for n, case in enumerate(cases):
        m, note = predict_case(model, case, mode, prompt)
        rows.append(CaseScore(case.id, dice(m, case.mask), iou(m, case.mask), hd95(m, case.mask), m, note))
        if progress:
            progress(n + 1, len(cases))
    return rows


def summary(rows: List[CaseScore]) -> Summary:
    d = np.array([r.dice for r in rows])
    h = np.array([r.hd95 for r in rows])
    finite = h[np.isfinite(h)]
    return Summary(
        len(rows),
        float(d.mean()),
        float(d.std()),
        float(np.median(d)),
        float(np.mean([r.iou for r in rows])),
        float(np.median(finite)) if finite.size else math.nan,
        int((~np.isfinite(h)).sum()),
        sum(1 for r in rows if r.note),
    )


def metrics_csv(rows: List[CaseScore]) -> bytes:
    """One row per case: id, dice, iou, hd95_px (``nan``/``inf`` by the empty-mask convention), note."""
    lines = io.StringIO()
    w = csv.writer(lines)
    w.writerow(["id", "dice", "iou", "hd95_px", "note"])
    for r in rows:
        w.writerow([r.id, f"{r.dice:.4f}", f"{r.iou:.4f}", f"{r.hd95:.2f}", r.note])
    return lines.getvalue().encode()


def write_report(rows: List[CaseScore], cases: List[Case], out: Path, overwrite: bool = True) -> str:
    """``metrics.csv`` and ``figure.png`` in ``out``, written as one unit (``atomic_write.write_all``: both or, on any
    failure, neither, with existing ones as they were; they are replaced only with ``overwrite``), and a
    summary line."""
    out = Path(out)
    targets = [out / "metrics.csv", out / "figure.png"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); choose another --out or pass --overwrite")
    fig = _figure(rows, cases)
    try:
        write_all(
            [
                bytes_output(targets[0], metrics_csv(rows)),
                Output(targets[1], lambda tmp: fig.savefig(tmp, dpi=80, format="png"), ".png", _check_png),
            ],
            overwrite=overwrite,
        )
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    s = summary(rows)
    empty = f" ({s.empty_truth} with an empty ground truth)" if s.empty_truth else ""
    return (
        f"cases {s.cases}{empty}  Dice {s.dice_mean:.3f} ± {s.dice_std:.3f} "
        f"(median {s.dice_median:.3f})  IoU {s.iou_mean:.3f}  HD95 median {s.hd95_median:.1f} px "
        f"({s.hd95_undefined} cases with an empty prediction or truth)\n"
        f"wrote {targets[0]} and {targets[1]}"
    )


def _figure(rows: List[CaseScore], cases: List[Case]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from PromiseSegmentLib.data.volume_io import overlay_rgb

    order = np.argsort([r.dice for r in rows])
    picks = [("worst", order[0]), ("median", order[len(order) // 2]), ("best", order[-1])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].hist([r.dice for r in rows], bins=20, range=(0, 1), color="#c44")
    axes[0].set_xlabel("Dice")
    axes[0].set_ylabel("cases")
    axes[0].set_title(f"Dice distribution (n={len(rows)})")
    for ax, (label, i) in zip(axes[1:], picks):
        ax.imshow(overlay_rgb(cases[i].rgb, [rows[i].prediction, cases[i].mask]))
        ax.set_title(f"{label}: {cases[i].id[:18]} Dice {rows[i].dice:.2f}")
        ax.axis("off")
    fig.suptitle("red: prediction, green: ground truth")
    fig.tight_layout()
    return fig


def _check_png(tmp: str) -> None:
    from PIL import Image

    with Image.open(tmp) as im:
        im.load()
