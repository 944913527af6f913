"""OpenVINO latency mode (one request, what the engine runs) against throughput mode (several streams and
requests in flight) and batches, for a whole volume's encodes: milliseconds per slice in one run. The encoder
is measured as one model (``FP32_STAGE_0`` off: in f32 the same as the engine's two parts).

    .venv/bin/python Testing/benchmarks/openvino_modes.py --slices 24 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "PromiseSegment"))
from PromiseSegmentLib.backbones import lite_medsam  # noqa: E402
from PromiseSegmentLib.backbones.registry import load_backbone  # noqa: E402
from PromiseSegmentLib.inference.openvino_runtime import OpenVinoEncoder  # noqa: E402


def cpu_name() -> str:
    try:
        name = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown CPU"
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(isa)})"


def compiled(encoder: OpenVinoEncoder, batch: int, hint: str, threads: int):
    size = encoder.backbone.spec.image_size
    model = encoder.models[0].clone()
    model.reshape([batch, 3, size, size])
    precision = encoder.hints["encoder"]
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads}
    return encoder.core.compile_model(model, "CPU", config)


def run_latency(net, slices: np.ndarray, batch: int) -> float:
    net(slices[:batch])  # first call: allocation
    start = time.perf_counter()
    for b in range(0, len(slices) - batch + 1, batch):
        net(slices[b : b + batch])
    return (time.perf_counter() - start) / (len(slices) // batch * batch)


def run_throughput(net, slices: np.ndarray) -> tuple:
    import openvino as ov

    queue = ov.AsyncInferQueue(net)  # as many requests as the plugin's streams want
    queue.start_async(slices[:1])
    queue.wait_all()
    start = time.perf_counter()
    for k in range(len(slices)):
        queue.start_async(slices[k : k + 1])
    queue.wait_all()
    return (time.perf_counter() - start) / len(slices), len(queue), net.get_property("NUM_STREAMS")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    args = ap.parse_args()
    backbone = load_backbone("lite_medsam")
    lite_medsam.FP32_STAGE_0 = False  # one model, whose modes and batches can be compared
    encoder = OpenVinoEncoder(backbone, args.precision, args.threads)
    size = backbone.spec.image_size
    slices = np.random.default_rng(0).normal(size=(args.slices, 3, size, size)).astype(np.float32)
    print(f"CPU: {cpu_name()}; LiteMedSAM encoder in OpenVINO {encoder.version}, {args.precision}, ")
    print(f"{args.threads} threads, {args.slices} slices of {size}x{size}")
    print("| mode | ms/slice | x latency mode |")
    print("|---|---|---|")
    base = run_latency(compiled(encoder, 1, "LATENCY", args.threads), slices, 1)
    print(f"| latency, batch 1 (the engine) | {1000 * base:.0f} | 1.00 |", flush=True)
    for batch in (2, 4):
        try:
            net = compiled(encoder, batch, "LATENCY", args.threads)
        except RuntimeError as exc:  # the traced model may keep batch-1 shapes inside
            print(f"| latency, batch {batch} | the converted model does not reshape: {str(exc)[:60]}... | |")
            continue
        t = run_latency(net, slices, batch)
        print(f"| latency, batch {batch} | {1000 * t:.0f} | {base / t:.2f} |", flush=True)
    t, requests, streams = run_throughput(compiled(encoder, 1, "THROUGHPUT", args.threads), slices)
    print(f"| throughput, {streams} streams, {requests} requests | {1000 * t:.0f} | {base / t:.2f} |", flush=True)


if __name__ == "__main__":
    main()
