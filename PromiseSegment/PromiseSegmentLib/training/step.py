"""The loss of one training step, in each phase.

Mask loss: BCE + soft Dice on the backbone's decode token at 256x256 (the paper's). A box APM may add an
auxiliary loss (``box_loss_weight``): L1 + generalised IoU between its box and the mask's bounding box,
BCE of its objectness map against the mask, and BCE of its presence logit. This departs from the paper's
mask-only training on purpose: through the prompt encoder's Fourier features the mask loss alone barely
moves a box (docs/benchmarks.md). The APM warm-up trains the APM alone on the auxiliary loss, so IPS
cannot absorb what the APM should learn; ``user_box_share`` prompts part of each joint batch with
jittered ground-truth boxes, so IPS also serves a user's box.
"""

from __future__ import annotations

from typing import List, cast

import numpy as np
import torch

from PromiseSegmentLib.inference.engine import InferenceEngine, PromptBatch
from PromiseSegmentLib.model.adapter import Adapter
from PromiseSegmentLib.model.forward import promise_forward
from PromiseSegmentLib.training.batches import Batch, Encoded, flip_batch, user_prompts
from PromiseSegmentLib.training.config import TrainConfig
from PromiseSegmentLib.training.losses import apm_aux_loss, seg_loss

USER_BOX_JITTER = 0.1  # a user's box is loose: each side moved by up to 10 % of the box's size


def warmup_loss(
    adapter: Adapter, cfg: TrainConfig, batch: Batch, gen: torch.Generator, image_size: int
) -> torch.Tensor:
    """The APM alone, on its auxiliary loss (on randomly mirrored taps with ``flip_warmup``)."""
    assert adapter.apm is not None, "a warm-up epoch needs an APM"
    if cfg.flip_warmup:
        batch = flip_batch(batch, gen, image_size)
    return apm_aux_loss(adapter.apm(batch.taps, prepared=True), batch, image_size)


def joint_loss(
    engine: InferenceEngine,
    adapter: Adapter,
    cfg: TrainConfig,
    items: List[Encoded],
    batch: Batch,
    rng: np.random.Generator,
) -> torch.Tensor:
    """The mask loss (+ the APM's auxiliary loss); with ``user_box_share``, that share of the images is
    prompted by a jittered ground-truth box through IPS instead of by the APM."""
    spec, backbone = engine.spec, engine.backbone
    features = batch.features
    assert features is not None, "a joint step reads the image embeddings"
    boxed = torch.zeros(len(items), dtype=torch.bool, device=batch.target.device)
    if cfg.mode == "apm+ips" and cfg.user_box_share > 0:
        draw = torch.as_tensor(rng.random(len(items)) < cfg.user_box_share, device=boxed.device)
        boxed = draw & batch.present
    loss = batch.target.new_zeros(())
    if bool(boxed.any()):
        box = cast(torch.Tensor, user_prompts(items, batch, "box", rng, spec, jitter=USER_BOX_JITTER).boxes)
        out = promise_forward(backbone, adapter, features[boxed], None, PromptBatch(boxes=box[boxed]), "ips")
        loss = loss + seg_loss(out.low_res[:, 0].float(), batch.target[boxed]) * int(boxed.sum())
    rest = ~boxed
    if bool(rest.any()):
        sub = batch.rows(rest)
        kept = [it for it, r in zip(items, rest.tolist()) if r]
        user = user_prompts(kept, sub, cfg.user_prompt, rng, spec, jitter=0.05)
        out = promise_forward(backbone, adapter, features[rest], sub.taps, user, cfg.mode, taps_prepared=True)
        part = seg_loss(out.low_res[:, 0].float(), sub.target)
        if cfg.box_loss_weight and out.apm is not None and cfg.apm_joint_lr > 0:  # else the APM is not trained
            part = part + cfg.box_loss_weight * apm_aux_loss(out.apm, sub, spec.image_size)
        loss = loss + part * int(rest.sum())
    return loss / len(items)
