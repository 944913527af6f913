"""Benchmark (not a test): peak memory and time of SceneLogic.segmentVolume on a large volume
in a real MRML scene (slicer-core), automatic mode, every slice.

    .venv/bin/python Testing/benchmarks/volume_memory.py [--shape 300 512 512] [--slices 10 300] [--cache-mb 0 1024]

Each run happens in a fresh subprocess so that its peak RSS is its own; one table is printed.
Streaming means the peak does not grow with the number of slices segmented beyond the embedding
cache's own bound (``--cache-mb``) and the one KJI mask written at the end.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def child(shape, slices, cache_mb):
    import resource
    import time

    import numpy as np

    sys.path[:0] = [str(ROOT / "PromiseSegment"), str(ROOT / "Testing" / "utils")]
    from PromiseSegmentLib.inference.openmp import set_default_waiting

    set_default_waiting()  # as the command line (before torch is imported)
    from slicer_scene import add_segmentation, add_volume, make_app, oblique_matrix

    from PromiseSegmentLib.backbones.registry import load_backbone
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter
    from PromiseSegmentSlicerLib.logic import SceneLogic

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    app = make_app()
    rng = np.random.default_rng(0)
    volume = add_volume(app.scene, rng.integers(-1000, 1000, shape, dtype=np.int16), oblique_matrix())
    seg = add_segmentation(app.scene, volume)
    logic = SceneLogic(embeddingCacheBytes=cache_mb << 20)
    adapter = build_adapter(TrainConfig(apm_fusion_dim=64, apm_tap_pool=2), load_backbone()).eval()
    logic.loadModel(adapter=adapter)
    before = rss_mb()
    predicted = {}

    def progress(done, total):
        if done == total:  # every slice predicted, nothing written yet
            predicted["mb"] = rss_mb()

    t = time.time()
    logic.segmentVolume(volume, seg, adapter=adapter, sliceRange=(0, slices - 1), progress=progress)
    print(
        json.dumps(
            {
                "slices": slices,
                "before_mb": before,
                "predicted_mb": predicted["mb"],
                "peak_mb": rss_mb(),
                "seconds": time.time() - t,
                "cache_mb": logic.embeddingCache.bytes / 2**20,
            }
        )
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", nargs=3, type=int, default=[300, 512, 512], help="K J I")
    ap.add_argument("--slices", nargs="+", type=int, default=[10, 300])
    ap.add_argument("--cache-mb", nargs="+", type=int, default=[0, 1024], help="embedding cache bounds to compare")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(tuple(args.shape), args.slices[0], args.cache_mb[0])
        return
    volume_mb = 2 * args.shape[0] * args.shape[1] * args.shape[2] / 2**20
    print(
        f"volume {args.shape[2]}x{args.shape[1]}x{args.shape[0]} int16 = {volume_mb:.0f} MB, LiteMedSAM backbone, "
        "automatic (APM+IPS), CPU"
    )
    print(
        "| cache bound (MB) | slices segmented | RSS before run (MB) | peak after prediction (MB) | "
        "peak after writing (MB) | growth (MB) | cache held (MB) | time (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for cache_mb in args.cache_mb:
        for n in args.slices:
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    "--shape",
                    *map(str, args.shape),
                    "--slices",
                    str(n),
                    "--cache-mb",
                    str(cache_mb),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {cache_mb} | {n} | {r['before_mb']:.0f} | {r['predicted_mb']:.0f} | {r['peak_mb']:.0f} | "
                f"{r['peak_mb'] - r['before_mb']:.0f} | {r['cache_mb']:.0f} | {r['seconds']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
