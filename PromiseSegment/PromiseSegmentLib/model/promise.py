"""ProMISe = a frozen backbone + an optional APM/IPS adapter.

One forward (``promise_forward``) serves training and inference, and one function (``resolve_mode``)
decides the mode:

- ``apm+ips``    automatic: the APM's prompts (box and/or points), the IPS shift, no user input
- ``ips``        the user's points/box with the IPS shift
- ``apm+clicks`` the APM's prompts merged with the user's clicks (a user box replaces the APM's), IPS
- ``vanilla``    the backbone alone with the user's prompts
- ``auto``       picks from the above by what is available
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from PromiseSegmentLib.backbones.base import LOW_RES, LoadedBackbone
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.inference.engine import ImageEmbedding, Prediction, SamEngine
from PromiseSegmentLib.inference.volume_loop import segment_slice, segment_volume, vanilla_predict
from PromiseSegmentLib.model.adapter import Adapter, load_adapter, read_metadata
from PromiseSegmentLib.model.decoder import decode_masks
from PromiseSegmentLib.modes import APM_MODES, MODES, resolve_mode  # noqa: F401  (re-exported)
from PromiseSegmentLib.names import DEFAULT_COLOR, DEFAULT_NAME

PRESENCE_THRESHOLD = 0.0  # presence logit: below it, an automatic run leaves the image empty


@dataclass
class PromptBatch:
    """Prompts for B images in the backbone's input frame: points (B, M, 2) as (x, y) with labels (B, M)
    (1 positive, 0 negative, -1 padding), boxes (B, 4) as (x0, y0, x1, y1), mask logits (B, 1, 256, 256)."""

    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None


@dataclass
class ForwardOutput:
    low_res: torch.Tensor  # (B, 1, 256, 256) logits of the backbone's decode token
    iou: torch.Tensor  # (B, 1)
    prompts: PromptBatch  # what was actually decoded (APM's included)
    apm: Optional[object] = None  # the APM's ApmOutput, for auxiliary losses and presence


def promise_forward(backbone: LoadedBackbone, adapter: Optional[Adapter], features: torch.Tensor,
                    taps, user: PromptBatch, mode: str, taps_prepared: bool = False,
                    decode=None) -> ForwardOutput:
    """Batched, differentiable ProMISe forward (``mode`` already resolved; not ``vanilla``'s best-of-3).

    ``features`` (B, 256, 64, 64) image embeddings; ``taps`` the APM's encoder taps (list of (B, C, h, w));
    ``user`` prompts in the input frame. Decodes the backbone's mask token with the IPS shift.
    ``decode`` (default: ``decode_masks`` on the backbone in fp32, differentiable) runs the mask decoder;
    inference passes the engine's ``decode`` (its precision) - the APM's box and the prompt encoder's
    positional encoding of it stay in fp32 either way, so the prompt itself is exactly the fp32 one."""
    sam = backbone.sam
    apm_out = adapter.apm(taps, prepared=taps_prepared) if mode in APM_MODES else None
    points, labels, boxes = user.points, user.labels, user.boxes
    if apm_out is not None:
        if apm_out.points is not None:
            points, labels = ((apm_out.points, apm_out.labels) if mode == "apm+ips" or user.points is None else
                              (torch.cat([apm_out.points, user.points.to(apm_out.points)], 1),
                               torch.cat([apm_out.labels.to(user.labels), user.labels], 1)))
        elif mode == "apm+ips":
            points = labels = None
        if apm_out.box is not None and (mode == "apm+ips" or user.boxes is None):
            boxes = apm_out.box
    sparse, dense = sam.prompt_encoder(points=None if points is None else (points, labels), boxes=boxes,
                                       masks=user.masks)
    b = features.shape[0]
    if sparse.shape[0] != b:  # no prompts at all: the prompt encoder returns a batch of one
        sparse, dense = sparse.expand(b, -1, -1), dense.expand(b, -1, -1, -1)
    shift = adapter.ips(features) if adapter is not None and adapter.ips is not None and mode != "vanilla" else None
    if decode is None:
        low_res, iou = decode_masks(sam, features, sparse, dense, False, shift, backbone.spec.mask_token)
    else:
        low_res, iou = decode(features, sparse, dense, False, shift, backbone.spec.mask_token)
    return ForwardOutput(low_res, iou, PromptBatch(points, labels, boxes, user.masks), apm_out)


def low_res_box(low_res: torch.Tensor, input_size: Tuple[int, int], image_size: int, threshold: float,
                margin: float = 0.0) -> Optional[torch.Tensor]:
    """The bounding box (pixel edges, (1, 4) in the input frame) of a (1, 1, 256, 256) low-res mask's
    foreground inside the image's part of the padded square, grown by ``margin`` of its width/height on
    each side and clipped to the image; None when the mask is empty."""
    scale = image_size / LOW_RES
    h, w = (int(math.ceil(n / scale)) for n in input_size)
    ys, xs = torch.nonzero(low_res[0, 0, :h, :w] > threshold, as_tuple=True)
    if ys.numel() == 0:
        return None
    x0, y0, x1, y1 = (float(v) * scale for v in (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1))
    dx, dy = (x1 - x0) * margin, (y1 - y0) * margin
    box = [max(x0 - dx, 0.0), max(y0 - dy, 0.0), min(x1 + dx, float(input_size[1])), min(y1 + dy, float(input_size[0]))]
    return torch.tensor([box], dtype=torch.float32, device=low_res.device)


def refine_boxes(backbone: LoadedBackbone, adapter: Adapter, features: torch.Tensor, out: ForwardOutput,
                 input_sizes, threshold: float, steps: int, margin: float, decode=None) -> ForwardOutput:
    """``steps`` re-decodes of a batch (``mode`` ips, the IPS shift, the APM's points if any), each with the
    previous masks' boxes grown by ``margin`` (``low_res_box``); images whose mask is empty keep theirs.
    The APM's output (presence) is kept. Inference and the trainer's choice of refinement share it."""
    for _ in range(steps):
        boxes = [low_res_box(out.low_res[i:i + 1], size, backbone.spec.image_size, threshold, margin)
                 for i, size in enumerate(input_sizes)]
        keep = [i for i, b in enumerate(boxes) if b is not None]
        if not keep:
            break
        idx = torch.tensor(keep, device=features.device)
        used = out.prompts
        points = None if used.points is None else used.points[idx]
        labels = None if used.labels is None else used.labels[idx]
        new_boxes = torch.cat([boxes[i] for i in keep]).to(features.device)
        refined = promise_forward(backbone, adapter, features[idx], None, PromptBatch(points, labels, new_boxes), "ips",
                                  decode=decode)
        low_res, iou = out.low_res.clone(), out.iou.clone()
        low_res[idx], iou[idx] = refined.low_res, refined.iou
        all_boxes = (used.boxes.clone() if used.boxes is not None else
                     features.new_zeros((features.shape[0], 4)))
        all_boxes[idx] = new_boxes.to(all_boxes.dtype)
        out = ForwardOutput(low_res, iou, PromptBatch(used.points, used.labels, all_boxes, used.masks), out.apm)
    return out


class ProMISeModel:
    """A loaded backbone (in ``engine``) with an optional adapter: predicts one image or a whole volume.

    Automatic mode with a box-predicting APM may refine the box, as the adapter says
    (``APM.set_refinement``): the APM's box is replaced by the bounding box of the mask it gave, grown by a
    margin, and the image decoded again with it and the IPS shift. The mask decoder finds the object's
    edges more reliably than the APM places the box (Kvasir: IPS with the true box 0.95, with the APM's
    0.84); the margin lets the mask grow where the APM's box cut it off."""

    def __init__(self, engine: SamEngine, adapter: Optional[Adapter] = None):
        self.engine, self.adapter = engine, adapter
        if adapter is not None:
            adapter.to(engine.device).eval()

    @property
    def backbone(self) -> LoadedBackbone:
        return self.engine.backbone

    @property
    def intensity(self) -> IntensityRule:
        return self.adapter.intensity if self.adapter else IntensityRule()

    @property
    def target_name(self) -> str:
        return self.adapter.target_name if self.adapter else DEFAULT_NAME

    @property
    def target_color(self) -> Tuple[float, float, float]:
        return tuple(self.adapter.target_color) if self.adapter else DEFAULT_COLOR

    @property
    def has_apm(self) -> bool:
        return self.adapter is not None and self.adapter.apm is not None

    def resolve_mode(self, mode: str, prompts: Prompts) -> str:
        has_points = prompts.points is not None and len(prompts.points) > 0
        mode = resolve_mode(mode, self.adapter, has_points, prompts.box is not None)
        if self.backbone.spec.box_only and mode in ("ips", "vanilla") and prompts.box is None:
            raise InputError(f"{self.backbone.name} was trained with box prompts only (points alone segment "
                             f"nothing): draw a box, or use an adapter with an APM for automatic prompts")
        return mode

    def _user_batch(self, emb: ImageEmbedding, prompts: Prompts) -> PromptBatch:
        points, box, mask = self.engine.prompt_tensors(emb, prompts)
        return PromptBatch(None if points is None else points[0], None if points is None else points[1],
                           None if box is None else box[:, 0], mask)

    @torch.no_grad()
    def predict(self, emb: ImageEmbedding, prompts: Optional[Prompts] = None, output_size=None,
                mode: str = "auto") -> Prediction:
        """One encoded image. ``prompts`` in the image's pixels (x = column, y = row); the mask comes back
        at ``output_size`` (default: the encoded image's grid); ``points``/``box`` of the result are the
        prompts actually used (the APM's included), in the image's pixels."""
        prompts = prompts or Prompts()
        mode = self.resolve_mode(mode, prompts)
        output_size = tuple(output_size or emb.original_size)
        if mode == "vanilla":
            return vanilla_predict(self.engine, emb, prompts, output_size)
        if mode in APM_MODES and emb.taps is None:
            raise RuntimeError("the engine did not capture the encoder taps the APM reads")
        out = self._forward(emb.features, emb.taps, self._user_batch(emb, prompts), mode, [emb.input_size])
        logits = self.engine.postprocess(out.low_res, emb, output_size)
        masks = (logits > self.engine.mask_threshold)[0].cpu().numpy()
        if (mode == "apm+ips" and out.apm is not None and out.apm.presence is not None
                and float(out.apm.presence[0]) < PRESENCE_THRESHOLD):
            masks[:] = False  # the APM says the target is not on this image
        spec, size = self.backbone.spec, emb.original_size
        used = out.prompts
        points = None if used.points is None else spec.from_input_frame(used.points[0].float().cpu().numpy(), size)
        box = None if used.boxes is None else spec.from_input_frame(
            used.boxes[0].float().cpu().numpy().reshape(2, 2), size).reshape(4)
        return Prediction(masks, logits[0].float().cpu().numpy(), out.iou[0].float().cpu().numpy(),
                          out.low_res[0].float().cpu().numpy(), points,
                          None if used.labels is None else used.labels[0].cpu().numpy(), box)

    def _forward(self, features, taps, user: PromptBatch, mode: str, input_sizes) -> ForwardOutput:
        """Inference: ``promise_forward`` with the decoder in the engine's precision, then in automatic
        mode the adapter's box refinement."""
        out = promise_forward(self.backbone, self.adapter, features, taps, user, mode, decode=self.engine.decode)
        if mode == "apm+ips" and out.apm is not None and out.apm.box is not None:
            apm = self.adapter.apm
            out = refine_boxes(self.backbone, self.adapter, features, out, input_sizes, self.engine.mask_threshold,
                               apm.box_refinement, apm.refinement_margin, self.engine.decode)
        return out

    @torch.no_grad()
    def predict_masks(self, embs: Sequence[ImageEmbedding], output_size: Tuple[int, int]) -> np.ndarray:
        """Automatic mode (``apm+ips``, no user prompts) for a batch of images encoded at the same size
        (slices of one volume): APM, IPS, decoder and box refinement run as one batch, and the logits are
        resampled to ``output_size`` and thresholded once for the batch, on the engine's device; only the
        bool masks (B, H, W) come back. Equal to ``predict`` on each image."""
        if not embs:
            return np.zeros((0, *output_size), bool)
        if len({e.input_size for e in embs}) != 1 or len({e.original_size for e in embs}) != 1:
            raise ValueError("predict_masks needs images encoded at one size (slices of one volume)")
        self.resolve_mode("apm+ips", Prompts())
        if any(e.taps is None for e in embs):
            raise RuntimeError("the engine did not capture the encoder taps the APM reads")
        features = torch.cat([e.features for e in embs])
        taps = [torch.cat(level) for level in zip(*(e.taps for e in embs))]
        out = self._forward(features, taps, PromptBatch(), "apm+ips", [e.input_size for e in embs])
        masks = self.engine.postprocess(out.low_res, embs[0], output_size)[:, 0] > self.engine.mask_threshold
        if out.apm.presence is not None:
            masks &= (out.apm.presence >= PRESENCE_THRESHOLD)[:, None, None]  # absent: left empty
        return masks.cpu().numpy()

    def is_automatic(self, mode: str) -> bool:
        """Whether ``mode`` segments every slice by itself (APM) rather than only prompted slices."""
        return self.has_apm and mode in ("auto",) + APM_MODES

    def segment_volume(self, volume: np.ndarray, ijk_to_ras: np.ndarray, mode: str = "auto",
                       **kwargs) -> np.ndarray:
        """Volume (KJI, or KJI x 3 RGB) at ``ijk_to_ras`` -> uint8 KJI mask on the same grid; see
        ``volume_segmentation.segment_volume`` for the other arguments (axis, slice_range, prompts in each
        slice's pixels, progress, cancel). The adapter's intensity rule applies unless one is given."""
        kwargs.setdefault("intensity", self.intensity)
        kwargs.setdefault("box_propagation", self.backbone.spec.box_only)
        return segment_volume(self.in_mode(mode), volume, ijk_to_ras, automatic=self.is_automatic(mode), **kwargs)

    def in_mode(self, mode: str = "auto") -> "ModelInMode":
        """This model fixed to one mode: a ``volume_segmentation.SliceModel`` for the volume loop."""
        return ModelInMode(self, mode)

    def segment_slice(self, volume: np.ndarray, ijk_to_ras: np.ndarray, axis, index: int,
                      prompts: Optional[Prompts] = None, previous_mask: Optional[np.ndarray] = None,
                      mode: str = "auto", value_range=None) -> Prediction:
        """Slice ``index`` along ``axis`` -> ``Prediction`` on that slice's native grid (rows, columns as
        ``take_slice`` gives them); ``prompts`` in that slice's pixels (x = column, y = row)."""
        return segment_slice(self.in_mode(mode), volume, ijk_to_ras, axis, index, prompts, previous_mask,
                             self.intensity, value_range)


class ModelInMode:
    """A ``ProMISeModel`` with its mode fixed: the two calls the volume loop makes (``SliceModel``)."""

    def __init__(self, model: ProMISeModel, mode: str):
        self.model, self.mode = model, mode

    @property
    def batch_size(self) -> int:
        return self.model.engine.batch_size

    def encode(self, images, cancel=None):
        return self.model.engine.encode(images, cancel=cancel)

    def predict(self, emb: ImageEmbedding, prompts: Prompts, output_size) -> Prediction:
        return self.model.predict(emb, prompts, output_size, self.mode)

    def predict_masks(self, embs, output_size) -> Optional[np.ndarray]:
        """Unprompted slices in one batch, when this mode is automatic (``apm+ips``); None otherwise."""
        if self.model.resolve_mode(self.mode, Prompts()) != "apm+ips":
            return None
        return self.model.predict_masks(embs, output_size)

    def mask_to_prompt(self, emb: ImageEmbedding, mask: np.ndarray):
        return self.model.engine.mask_to_prompt(emb, mask)


def engine_for(backbone: LoadedBackbone, adapter: Optional[Adapter], device=None, batch_size=None,
               cache=None, precision: str = "auto", threads: Optional[int] = None) -> SamEngine:
    """The engine users get: ``precision="auto"`` is the fastest mode measured to agree with fp32
    (``acceleration``); it captures the encoder taps when the adapter has an APM."""
    return SamEngine(backbone, device=device, batch_size=batch_size,
                     capture_taps=adapter is not None and adapter.apm is not None, cache=cache,
                     precision=precision, threads=threads)


def load_model(backbone: Optional[str] = None, adapter_path: Optional[str] = None, device: Optional[str] = None,
               allow_mismatch: bool = False, batch_size: Optional[int] = None, precision: str = "auto",
               threads: Optional[int] = None) -> ProMISeModel:
    """Backbone (registry name or checkpoint path; ``None``: the adapter's backbone, else the default) plus
    an optional adapter file. The adapter's metadata is read first, so a mismatch is reported before any
    weights are loaded."""
    expected = read_metadata(adapter_path)["backbone"]["name"] if adapter_path else None
    loaded = load_backbone(backbone or expected, expected)
    adapter = load_adapter(adapter_path, loaded, allow_mismatch) if adapter_path else None
    return ProMISeModel(engine_for(loaded, adapter, device, batch_size, precision=precision, threads=threads),
                        adapter)
