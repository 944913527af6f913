"""Evaluate a model on image+mask cases: per-case Dice/IoU/HD95, a CSV, a summary table and a figure."""
from __future__ import annotations

import csv
import io
import math
import zlib
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from .datasets import Case, sample_points
from .engine import Prompts
from .metrics import dice, hd95, iou
from .paths import write_atomically, write_bytes_atomically
from .preprocessing import mask_bbox


def simulated_prompts(case: Case, prompt: str) -> Prompts:
    if prompt == "center":
        h, w = case.mask.shape
        return Prompts(points=[[w / 2, h / 2]], labels=[1])
    if prompt == "gt-points":
        pts, labels = sample_points(case.mask, 3, 3, np.random.default_rng(zlib.crc32(case.id.encode())))
        return Prompts(points=pts, labels=labels)
    if prompt == "gt-box":
        return Prompts(box=mask_bbox(case.mask))
    return Prompts()


def evaluate_cases(model, cases: List[Case], mode: str = "auto", prompt: str = "none",
                   progress: Optional[Callable[[int, int], None]] = None) -> List[Dict]:
    rows = []
    for n, case in enumerate(cases):
        emb = model.engine.encode([case.rgb])[0]
        pred = model.predict(emb, simulated_prompts(case, prompt), mode=mode)
        m = pred.masks[0]
        rows.append({"id": case.id, "dice": dice(m, case.mask), "iou": iou(m, case.mask),
                     "hd95": hd95(m, case.mask), "pred": m})
        if progress:
            progress(n + 1, len(cases))
    return rows


def summary(rows: List[Dict]) -> Dict[str, float]:
    d = np.array([r["dice"] for r in rows])
    h = np.array([r["hd95"] for r in rows])
    finite = h[np.isfinite(h)]
    return {"cases": len(rows), "dice_mean": float(d.mean()), "dice_std": float(d.std()),
            "dice_median": float(np.median(d)), "iou_mean": float(np.mean([r["iou"] for r in rows])),
            "hd95_median": float(np.median(finite)) if finite.size else math.inf,
            "hd95_undefined": int((~np.isfinite(h)).sum())}


def write_report(rows: List[Dict], cases: List[Case], out: Path, overwrite: bool = True) -> str:
    """``metrics.csv`` and ``figure.png`` in ``out`` (each written atomically; existing ones are replaced
    only with ``overwrite``), and a summary line."""
    out = Path(out)
    targets = [out / "metrics.csv", out / "figure.png"]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist(s); choose another --out or pass --overwrite")
    lines = io.StringIO()
    w = csv.writer(lines)
    w.writerow(["id", "dice", "iou", "hd95_px"])
    for r in rows:
        w.writerow([r["id"], f"{r['dice']:.4f}", f"{r['iou']:.4f}", f"{r['hd95']:.2f}"])
    write_bytes_atomically(targets[0], lines.getvalue().encode())
    s = summary(rows)
    _figure(rows, cases, targets[1])
    return (f"cases {s['cases']}  Dice {s['dice_mean']:.3f} ± {s['dice_std']:.3f} (median {s['dice_median']:.3f})  "
            f"IoU {s['iou_mean']:.3f}  HD95 median {s['hd95_median']:.1f} px "
            f"({s['hd95_undefined']} cases with an empty prediction or truth)\n"
            f"wrote {targets[0]} and {targets[1]}")


def _figure(rows: List[Dict], cases: List[Case], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .volume_io import overlay_rgb

    order = np.argsort([r["dice"] for r in rows])
    picks = [("worst", order[0]), ("median", order[len(order) // 2]), ("best", order[-1])]
    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    axes[0].hist([r["dice"] for r in rows], bins=20, range=(0, 1), color="#c44")
    axes[0].set_xlabel("Dice")
    axes[0].set_ylabel("cases")
    axes[0].set_title(f"Dice distribution (n={len(rows)})")
    for ax, (label, i) in zip(axes[1:], picks):
        ax.imshow(overlay_rgb(cases[i].rgb, [rows[i]["pred"], cases[i].mask]))
        ax.set_title(f"{label}: {cases[i].id[:18]} Dice {rows[i]['dice']:.2f}")
        ax.axis("off")
    fig.suptitle("red: prediction, green: ground truth")
    fig.tight_layout()
    try:
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"), suffix=".png",
                         verify=_check_png)
    finally:
        plt.close(fig)


def _check_png(tmp: str) -> None:
    from PIL import Image

    with Image.open(tmp) as im:
        im.load()
