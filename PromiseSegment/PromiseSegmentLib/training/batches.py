"""Training batches: an encoded image, a batch of them on the device, and the prompts and flips applied to a
batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from PromiseSegmentLib.data.datasets import sample_points
from PromiseSegmentLib.data.prompts import mask_box
from PromiseSegmentLib.inference.engine import PromptBatch


@dataclass
class Encoded:
    """One training image, encoded: what an epoch needs without the encoder."""

    features: Optional[torch.Tensor]  # (1, 256, 64, 64) fp16; None when not read (the APM's warm-up)
    taps: List[torch.Tensor]  # APM-ready taps (after ``APM.prepare_taps``), fp16
    target: torch.Tensor  # (256, 256) bool, the mask in the decoder's frame
    box: Optional[torch.Tensor]  # (4,) the mask's bounding box in the input frame, None if empty
    input_size: tuple
    original_size: tuple


def input_box(mask: np.ndarray, spec, original_size) -> Optional[torch.Tensor]:
    """The mask's bounding box (pixel edges, x0, y0, x1, y1) in the backbone's input frame."""
    b = mask_box(mask, edges=True)
    if b is None:
        return None
    corners = spec.to_input_frame(b.reshape(2, 2), original_size)
    return torch.as_tensor(corners.reshape(4), dtype=torch.float32)


@dataclass
class Batch:
    features: Optional[torch.Tensor]
    taps: List[torch.Tensor]
    target: torch.Tensor  # (B, 256, 256) float
    boxes: torch.Tensor  # (B, 4) ground-truth boxes (zeros where empty)
    present: torch.Tensor  # (B,) bool

    def rows(self, keep: torch.Tensor) -> "Batch":
        """The images where ``keep`` (a (B,) bool mask) is true."""
        features = None if self.features is None else self.features[keep]
        return Batch(features, [t[keep] for t in self.taps], self.target[keep], self.boxes[keep], self.present[keep])


def collate(items: List[Encoded], device) -> Batch:
    taps = [torch.cat([it.taps[k] for it in items]).to(device).float() for k in range(len(items[0].taps))]
    boxes = torch.stack([it.box if it.box is not None else torch.zeros(4) for it in items]).to(device)
    present = torch.tensor([it.box is not None for it in items], device=device)
    features = [it.features for it in items if it.features is not None]
    return Batch(
        torch.cat(features).to(device).float() if len(features) == len(items) else None,
        taps,
        torch.stack([it.target for it in items]).to(device).float(),
        boxes,
        present,
    )


def flip_batch(batch: Batch, gen: torch.Generator, image_size: int) -> Batch:
    """The same random horizontal/vertical flip of a batch's taps, target and boxes, about the padded input
    square. Only for the APM alone: its head is translation-equivariant, while the frozen decoder never
    saw flipped embeddings."""
    taps, target, boxes = list(batch.taps), batch.target, batch.boxes.clone()
    for axis, (lo, hi) in ((-1, (0, 2)), (-2, (1, 3))):
        if bool(torch.rand((), generator=gen) < 0.5):
            taps, target = [t.flip(axis) for t in taps], target.flip(axis)
            boxes[:, [lo, hi]] = image_size - boxes[:, [hi, lo]]
    return Batch(batch.features, taps, target, boxes, batch.present)


def user_prompts(
    items: List[Encoded], batch: Batch, kind: str, rng: np.random.Generator, spec, jitter: float = 0.0
) -> PromptBatch:
    """Ground-truth prompts in the input frame: the mask's box (optionally jittered) or sampled points."""
    if kind == "box":
        boxes = batch.boxes.clone()
        if jitter:
            side = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noise = torch.as_tensor(rng.uniform(-jitter, jitter, boxes.shape), dtype=boxes.dtype, device=boxes.device)
            boxes = boxes + noise * side
        full = torch.tensor([0, 0, spec.image_size, spec.image_size], dtype=boxes.dtype, device=boxes.device)
        boxes = torch.where(batch.present[:, None], boxes, full)  # an empty image: the whole image
        return PromptBatch(boxes=boxes)
    if kind == "points":
        pts, labels = [], []
        for it in items:  # drawn on the decoder-frame target, inside the image's part of the padded square
            scale = spec.image_size / it.target.shape[-1]
            rows, cols = (int(np.ceil(n / scale)) for n in it.input_size)
            p, lab = sample_points(it.target[:rows, :cols].numpy(), 3, 3, rng)
            pts.append(torch.as_tensor((p + 0.5) * scale, dtype=torch.float32))
            labels.append(torch.as_tensor(lab))
        width = max(len(lab) for lab in labels)
        for k in range(len(pts)):  # pad to a common count with SAM's "not a point" label (-1)
            pad = width - len(labels[k])
            pts[k] = torch.cat([pts[k], torch.zeros(pad, 2)])
            labels[k] = torch.cat([labels[k], torch.full((pad,), -1, dtype=labels[k].dtype)])
        dev = batch.target.device
        return PromptBatch(torch.stack(pts).to(dev), torch.stack(labels).to(dev))
    return PromptBatch()
