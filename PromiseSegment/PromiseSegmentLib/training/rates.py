"""How fast this machine trains: seconds per image for an encode, an APM warm-up step, a joint step and a
selection forward, measured once with the loaded backbone on a real training image (a few seconds), so that
a run's plan states an estimate for this machine rather than for the one the defaults were tuned on."""

from __future__ import annotations

import statistics
import time

import torch

from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.inference.engine import InferenceEngine, PromptBatch
from PromiseSegmentLib.model.forward import promise_forward
from PromiseSegmentLib.training.batches import collate
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.features import encode_case
from PromiseSegmentLib.training.losses import apm_aux_loss, seg_loss
from PromiseSegmentLib.training.recipe import MachineRates
from PromiseSegmentLib.training.setup import build_adapter, track_apm


def _seconds(job, repeats: int = 4) -> float:
    """The median of ``repeats`` runs after the first (which pays for allocation and kernel selection). One
    run alone swung by 2x on a 2-core machine (a joint step 93-190 ms), and so did the plan's estimate."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        job()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) if len(times) > 1 else times[0]


def measure_rates(engine: InferenceEngine, cfg: TrainConfig, case: Case) -> MachineRates:
    """Rates for ``cfg`` on ``engine``, with a throwaway adapter (the run's own is not touched)."""
    adapter = build_adapter(cfg, engine.backbone).to(engine.device)
    capture = engine.capture_taps
    engine.capture_taps = adapter.apm is not None
    try:
        encode = _seconds(lambda: encode_case(engine, adapter.apm, case.rgb, case.mask))
        enc = encode_case(engine, adapter.apm, case.rgb, case.mask)
    finally:
        engine.capture_taps = capture
    size = max(1, min(cfg.batch_size, 8))
    batch = collate([enc] * size, engine.device)
    backbone, spec = engine.backbone, engine.spec

    def warmup_step():
        track_apm(adapter, cfg, warmup=True)
        if adapter.apm is not None:
            loss = apm_aux_loss(adapter.apm(batch.taps, prepared=True), batch, spec.image_size)
            if loss.requires_grad:  # a points-only APM has no auxiliary loss
                loss.backward()

    def joint_step():
        track_apm(adapter, cfg, warmup=False)
        out = promise_forward(backbone, adapter, batch.features, batch.taps, _prompts(batch, cfg), cfg.mode, True)
        seg_loss(out.low_res[:, 0].float(), batch.target).backward()

    def forward():
        with torch.no_grad():
            promise_forward(backbone, adapter, batch.features, batch.taps, _prompts(batch, cfg), cfg.mode, True)

    where = f"{engine.threads} CPU threads" if engine.device.type == "cpu" else str(engine.device)
    return MachineRates(
        encode, _seconds(warmup_step) / size, _seconds(joint_step) / size, _seconds(forward) / size, where
    )


def _prompts(batch, cfg: TrainConfig) -> PromptBatch:
    return PromptBatch(boxes=batch.boxes) if cfg.mode == "ips" else PromptBatch()
