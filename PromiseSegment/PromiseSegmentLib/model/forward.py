"""The ProMISe forward, batched and differentiable: the APM's prompts (or the user's), the IPS shift on the
mask token, the frozen decoder; and the automatic box refinement that re-decodes from a mask's own box."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from PromiseSegmentLib.backbones.base import LOW_RES, LoadedBackbone
from PromiseSegmentLib.data.prompts import mask_box
from PromiseSegmentLib.inference.engine import PromptBatch
from PromiseSegmentLib.model.adapter import Adapter
from PromiseSegmentLib.model.apm import ApmOutput
from PromiseSegmentLib.model.decoder import decode_masks
from PromiseSegmentLib.modes import APM_MODES


@dataclass
class ForwardOutput:
    low_res: torch.Tensor  # (B, 1, 256, 256) logits of the backbone's decode token
    iou: torch.Tensor  # (B, 1)
    prompts: PromptBatch  # what was actually decoded (APM's included)
    apm: Optional[ApmOutput] = None  # for auxiliary losses and presence


def promise_forward(
    backbone: LoadedBackbone,
    adapter: Optional[Adapter],
    features: torch.Tensor,
    taps,
    user: PromptBatch,
    mode: str,
    taps_prepared: bool = False,
    decode=None,
) -> ForwardOutput:
    """Batched, differentiable ProMISe forward (``mode`` already resolved; not ``vanilla``'s best-of-3).

    ``features`` (B, 256, 64, 64) image embeddings; ``taps`` the APM's encoder taps (list of (B, C, h, w));
    ``user`` prompts in the input frame. Decodes the backbone's mask token with the IPS shift.
    ``decode`` (default: ``decode_masks`` on the backbone in fp32, differentiable) runs the mask decoder;
    inference passes the engine's ``decode`` (its precision) - the APM's box and the prompt encoder's
    positional encoding of it stay in fp32 either way, so the prompt itself is exactly the fp32 one."""
    sam = backbone.sam
    apm_out = None
    if mode in APM_MODES:
        assert adapter is not None and adapter.apm is not None, "resolve_mode admits APM modes only with an APM"
        apm_out = adapter.apm(taps, prepared=taps_prepared)
    points, labels, boxes = user.points, user.labels, user.boxes
    if apm_out is not None:
        if apm_out.points is not None:
            if mode == "apm+ips" or user.points is None or user.labels is None:
                points, labels = apm_out.points, apm_out.labels
            else:
                points = torch.cat([apm_out.points, user.points.to(apm_out.points)], 1)
                labels = torch.cat([apm_out.labels.to(user.labels), user.labels], 1)
        elif mode == "apm+ips":
            points = labels = None
        if apm_out.box is not None and (mode == "apm+ips" or user.boxes is None):
            boxes = apm_out.box
    sparse, dense = sam.prompt_encoder(
        points=None if points is None else (points, labels), boxes=boxes, masks=user.masks
    )
    b = features.shape[0]
    if sparse.shape[0] != b:  # no prompts at all: the prompt encoder returns a batch of one
        sparse, dense = sparse.expand(b, -1, -1), dense.expand(b, -1, -1, -1)
    shift = adapter.ips(features) if adapter is not None and adapter.ips is not None and mode != "vanilla" else None
    if decode is None:
        low_res, iou = decode_masks(sam, features, sparse, dense, False, shift, backbone.spec.mask_token)
    else:
        low_res, iou = decode(features, sparse, dense, False, shift, backbone.spec.mask_token)
    return ForwardOutput(low_res, iou, PromptBatch(points, labels, boxes, user.masks), apm_out)


def low_res_box(
    low_res: torch.Tensor, input_size: Tuple[int, int], image_size: int, threshold: float, margin: float = 0.0
) -> Optional[torch.Tensor]:
    """The bounding box (pixel edges, (1, 4) in the input frame) of a (1, 1, 256, 256) low-res mask's
    foreground inside the image's part of the padded square, grown by ``margin`` of its width/height on
    each side and clipped to the image; None when the mask is empty."""
    scale = image_size / LOW_RES
    h, w = (int(math.ceil(n / scale)) for n in input_size)
    edges = mask_box((low_res[0, 0, :h, :w] > threshold).cpu().numpy(), edges=True)
    if edges is None:
        return None
    x0, y0, x1, y1 = (float(v) * scale for v in edges)
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    box = [max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, float(input_size[1])), min(y1 + dy, float(input_size[0]))]
    return torch.tensor([box], dtype=torch.float32, device=low_res.device)


def refine_boxes(
    backbone: LoadedBackbone,
    adapter: Adapter,
    features: torch.Tensor,
    out: ForwardOutput,
    input_sizes,
    threshold: float,
    steps: int,
    margin: float,
    decode=None,
) -> ForwardOutput:
    """``steps`` re-decodes of a batch (``mode`` ips, the IPS shift, the APM's points if any), each with the
    previous masks' boxes grown by ``margin`` (``low_res_box``); images whose mask is empty keep theirs.
    The APM's output (presence) is kept. Inference and the trainer's choice of refinement share it."""
    for _ in range(steps):
        found = [
            low_res_box(out.low_res[i : i + 1], size, backbone.spec.image_size, threshold, margin)
            for i, size in enumerate(input_sizes)
        ]
        boxes = [b for b in found if b is not None]
        keep = [i for i, b in enumerate(found) if b is not None]
        if not keep:
            break
        idx = torch.tensor(keep, device=features.device)
        used = out.prompts
        points = None if used.points is None else used.points[idx]
        labels = None if used.labels is None else used.labels[idx]
        new_boxes = torch.cat(boxes).to(features.device)
        refined = promise_forward(
            backbone, adapter, features[idx], None, PromptBatch(points, labels, new_boxes), "ips", decode=decode
        )
        low_res, iou = out.low_res.clone(), out.iou.clone()
        low_res[idx], iou[idx] = refined.low_res, refined.iou
        all_boxes = used.boxes.clone() if used.boxes is not None else features.new_zeros((features.shape[0], 4))
        all_boxes[idx] = new_boxes.to(all_boxes.dtype)
        out = ForwardOutput(low_res, iou, PromptBatch(used.points, used.labels, all_boxes, used.masks), out.apm)
    return out
