"""Benchmark (not a test): a cohort of synthetic CT volumes three ways, side by side in one run; one table.

    .venv/bin/python Testing/benchmarks/cohort_throughput.py [--volumes 20] [--slices 60] [--workers 2]

  (a) shell loop: one ``promise-segment segment VOLUME -o OUT`` process per volume (a model load each);
  (b) one process: ``promise-segment segment FOLDER --out-dir OUT`` (one model, the next volume read ahead);
  (c) Ray: the same with ``--cluster ray --cpus-per-worker CORES/workers`` on a local cluster.
Each writes .seg.nrrd files; (b) and (c) also results.csv. The adapter is UNTRAINED (timing only: APM +
IPS shapes as trained ones, presence forced on so every slice is decoded and written). Volumes are
512x512xN int16 (HU) NIfTI, gzip-compressed as clinical exports are. The machine line names the CPU.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "PromiseSegment"), str(ROOT / "Testing" / "utils"), str(ROOT / "Testing" / "benchmarks")]
CLI = [sys.executable, "-m", "PromiseSegmentLib.cli", "segment"]


def make_inputs(folder: Path, volumes: int, slices: int) -> None:
    import numpy as np
    import SimpleITK as sitk
    from speed_inputs import synthetic_ct

    folder.mkdir(parents=True)
    for n in range(volumes):
        image = sitk.GetImageFromArray(synthetic_ct(slices, seed=n).astype(np.int16))
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(folder / f"ct_{n:03d}.nii.gz"), True)


def make_adapter(path: Path) -> None:
    import torch

    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.data.preprocessing import IntensityRule
    from PromiseSegmentLib.model.adapter import save_adapter
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    cfg = TrainConfig(apm_fusion_dim=128, apm_tap_pool=2, intensity=IntensityRule.ct(40, 400).to_dict())
    adapter = build_adapter(cfg, load_backbone("lite_medsam"))
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(5.0)
    save_adapter(adapter.eval(), path)


def timed(command, env) -> float:
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({run.returncode}): {run.stderr[-1500:]}")
    return time.perf_counter() - start


def cpu_name() -> str:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--volumes", type=int, default=20)
    ap.add_argument("--slices", type=int, default=60)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip", default="", help="variants to leave out, e.g. 'a' (the shell loop is the slowest)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cohort-bench-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "PromiseSegment"), PROMISE_SEGMENT_PROGRESS_SECONDS="600")
    try:
        scans, adapter = work / "scans", work / "adapter.safetensors"
        make_inputs(scans, args.volumes, args.slices)
        make_adapter(adapter)
        common = ["--adapter", str(adapter), "--device", "cpu"]
        rows = []
        if "a" not in args.skip:
            out, start = work / "a", time.perf_counter()
            out.mkdir()
            for volume in sorted(scans.iterdir()):
                timed([*CLI, str(volume), "-o", str(out / volume.name.replace(".nii.gz", ".seg.nrrd")), *common], env)
            rows.append(("(a) shell loop, a process per volume", time.perf_counter() - start))
        if "b" not in args.skip:
            rows.append(("(b) one process", timed([*CLI, str(scans), "--out-dir", str(work / "b"), *common], env)))
        if "c" not in args.skip:
            cores = max(1, (os.cpu_count() or 2) // args.workers)
            ray = [*CLI, str(scans), "--out-dir", str(work / "c"), *common, "--cluster", "ray"]
            ray += ["--cpus-per-worker", str(cores)]
            rows.append(
                (
                    f"(c) Ray, {args.workers} workers x {cores} cores (local cluster, its start included)",
                    timed(ray, env),
                )
            )
        total = args.volumes * args.slices
        print(
            f"machine: {cpu_name()}, {os.cpu_count()} CPUs; {args.volumes} volumes of 512x512x{args.slices} "
            f"({total} slices), LiteMedSAM + APM + IPS, automatic"
        )
        print("| variant | wall s | volumes/min | slices/s | x shell loop |")
        print("|---|---|---|---|---|")
        base = rows[0][1] if "a" not in args.skip else None
        for name, seconds in rows:
            ratio = f"{base / seconds:.2f}" if base else "-"
            print(f"| {name} | {seconds:.0f} | {60 * args.volumes / seconds:.2f} | {total / seconds:.2f} | {ratio} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
