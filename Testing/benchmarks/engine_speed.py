"""Benchmark (not a test): image-encoding and decoding time per slice, side by side in one run.

    .venv/bin/python Testing/benchmarks/engine_speed.py [--backbones lite_medsam tiny_random vit_b] [--repeats 3]

``lite_medsam`` has its real weights; ``vit_b`` is SAM ViT-B's architecture with seeded random weights
(same cost as the real one); ``tiny_random`` is the test fixture.

Prints one table; compare rows of the same run (ratios), since machines are noisy.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PromiseSegment"))
from PromiseSegmentLib.backbone import BACKBONES, LoadedBackbone, freeze, load_backbone  # noqa: E402
from PromiseSegmentLib.engine import Prompts, SamEngine  # noqa: E402
from PromiseSegmentLib.sam_vit import build_seeded_sam  # noqa: E402


def backbone(name: str) -> LoadedBackbone:
    if name == "vit_b":
        return LoadedBackbone(BACKBONES["sam_vit_b"], freeze(build_seeded_sam("vit_b", 0).eval()), "random")
    return load_backbone(name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbones", nargs="+", default=["lite_medsam", "tiny_random", "vit_b"])
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(max(args.batch_sizes))]
    rows = []
    for variant in args.backbones:
        loaded = backbone(variant)
        for bs in args.batch_sizes:
            engine = SamEngine(loaded, device=args.device, batch_size=bs)
            engine.encode(images[:bs])  # warm-up
            t = time.perf_counter()
            for _ in range(args.repeats):
                embs = engine.encode(images[:bs])
            enc = (time.perf_counter() - t) / (args.repeats * bs)
            t = time.perf_counter()
            for _ in range(args.repeats):
                engine.predict(embs[0], Prompts(box=[150, 150, 350, 350]))
            dec = (time.perf_counter() - t) / args.repeats
            rows.append((variant, bs, enc, dec))
    base = rows[0][2]
    print(f"device: {engine.device}, "
          f"torch threads: {torch.get_num_threads()}")
    print(f"{'backbone':12s} {'batch':>5s} {'encode s/slice':>15s} {'decode s':>9s} {'encode ratio':>13s}")
    for variant, bs, enc, dec in rows:
        print(f"{variant:12s} {bs:5d} {enc:15.3f} {dec:9.3f} {enc / base:13.2f}")


if __name__ == "__main__":
    main()
