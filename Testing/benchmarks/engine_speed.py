"""Benchmark (not a test): image-encoding and decoding time per slice, side by side in one run, per
backbone, batch size and precision (``InferenceEngine(precision=...)``). For LiteMedSAM end to end (reference
loop, APM + IPS, agreement, prompt latency, memory, training) see ``speed.py``.

    .venv/bin/python Testing/benchmarks/engine_speed.py [--backbones lite_medsam tiny_random vit_b] [--repeats 3] \
        [--precisions fp32 auto]

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
from PromiseSegmentLib.backbones.base import LoadedBackbone, freeze  # noqa: E402
from PromiseSegmentLib.backbones.registry import BACKBONES, load_backbone  # noqa: E402
from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam  # noqa: E402
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.inference.engine import InferenceEngine


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
    ap.add_argument("--precisions", nargs="+", default=["fp32", "auto"], help="engine precisions to compare")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [(rng.random((512, 512, 3)) * 255).astype(np.uint8) for _ in range(max(args.batch_sizes))]
    rows = []
    for variant in args.backbones:
        loaded = backbone(variant)
        for bs in args.batch_sizes:
            for precision in args.precisions:
                engine = InferenceEngine(loaded, device=args.device, batch_size=bs, precision=precision)
                rows.append((variant, bs, engine.precision.name, *measure(engine, images[:bs], args.repeats)))
    base = rows[0][3]
    print(f"device: {engine.device}, torch threads: {torch.get_num_threads()}")
    print(
        f"{'backbone':12s} {'batch':>5s} {'precision':>9s} {'encode s/slice':>15s} {'decode s':>9s} "
        f"{'encode ratio':>13s}"
    )
    for variant, bs, precision, enc, dec in rows:
        print(f"{variant:12s} {bs:5d} {precision:>9s} {enc:15.3f} {dec:9.3f} {enc / base:13.2f}")


def measure(engine, images, repeats):
    """(encode seconds per slice, decode seconds for a box) after one warm-up."""
    engine.encode(images)
    t = time.perf_counter()
    for _ in range(repeats):
        embs = engine.encode(images)
    enc = (time.perf_counter() - t) / (repeats * len(images))
    t = time.perf_counter()
    for _ in range(repeats):
        engine.predict(embs[0], Prompts(box=[150, 150, 350, 350]))
    return enc, (time.perf_counter() - t) / repeats


if __name__ == "__main__":
    main()
