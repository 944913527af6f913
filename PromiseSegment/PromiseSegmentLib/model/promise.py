"""ProMISe = a frozen backbone + an optional APM/IPS adapter.

One forward (``forward.promise_forward``) serves training and inference, and one function
(``modes.resolve_mode``) decides the mode:

- ``apm+ips``    automatic: the APM's prompts (box and/or points), the IPS shift, no user input
- ``ips``        the user's points/box with the IPS shift
- ``apm+clicks`` the APM's prompts merged with the user's clicks (a user box replaces the APM's), IPS
- ``vanilla``    the backbone alone with the user's prompts
- ``auto``       picks from the above by what is available
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.data.preprocessing import IntensityRule
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.inference.engine import ImageEmbedding, InferenceEngine, Prediction, PromptBatch
from PromiseSegmentLib.inference.volume_loop import segment_slice, segment_volume, vanilla_predict
from PromiseSegmentLib.model.adapter import Adapter, load_adapter, read_metadata
from PromiseSegmentLib.model.forward import ForwardOutput, promise_forward, refine_boxes
from PromiseSegmentLib.modes import APM_MODES, resolve_mode
from PromiseSegmentLib.names import DEFAULT_COLOR, DEFAULT_NAME, RUNTIME_ENV

PRESENCE_THRESHOLD = 0.0  # presence logit: below it, an automatic run leaves the image empty


class ProMISeModel:
    """A loaded backbone (in ``engine``) with an optional adapter: predicts one image or a whole volume.

    Automatic mode with a box-predicting APM may refine the box, as the adapter says
    (``APM.set_refinement``): the APM's box is replaced by the bounding box of the mask it gave, grown by a
    margin, and the image decoded again with it and the IPS shift. The mask decoder finds the object's
    edges more reliably than the APM places the box (Kvasir: IPS with the true box 0.95, with the APM's
    0.84); the margin lets the mask grow where the APM's box cut it off."""

    def __init__(self, engine: InferenceEngine, adapter: Optional[Adapter] = None):
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
        box_only = self.backbone.name if self.backbone.spec.box_only else None
        return resolve_mode(mode, self.adapter, has_points, prompts.box is not None, box_only)

    @torch.no_grad()
    def predict(
        self, emb: ImageEmbedding, prompts: Optional[Prompts] = None, output_size=None, mode: str = "auto"
    ) -> Prediction:
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
        out = self._forward(emb.features, emb.taps, self.engine.prompt_tensors(emb, prompts), mode, [emb.input_size])
        logits = self.engine.postprocess(out.low_res, emb, output_size)
        masks = (logits > self.engine.mask_threshold)[0].cpu().numpy()
        if (
            mode == "apm+ips"
            and out.apm is not None
            and out.apm.presence is not None
            and float(out.apm.presence[0]) < PRESENCE_THRESHOLD
        ):
            masks[:] = False  # the APM says the target is not on this image
        spec, size = self.backbone.spec, emb.original_size
        used = out.prompts
        points = None if used.points is None else spec.from_input_frame(used.points[0].float().cpu().numpy(), size)
        box = (
            None
            if used.boxes is None
            else spec.from_input_frame(used.boxes[0].float().cpu().numpy().reshape(2, 2), size).reshape(4)
        )
        return Prediction(
            masks,
            logits[0].float().cpu().numpy(),
            out.iou[0].float().cpu().numpy(),
            out.low_res[0].float().cpu().numpy(),
            points,
            None if used.labels is None else used.labels[0].cpu().numpy(),
            box,
        )

    def _forward(self, features, taps, user: PromptBatch, mode: str, input_sizes) -> ForwardOutput:
        """Inference: ``promise_forward`` with the decoder in the engine's precision, then in automatic
        mode the adapter's box refinement."""
        out = promise_forward(self.backbone, self.adapter, features, taps, user, mode, decode=self.engine.decode)
        apm = self.adapter.apm if self.adapter is not None else None
        if mode == "apm+ips" and apm is not None and out.apm is not None and out.apm.box is not None:
            assert self.adapter is not None
            out = refine_boxes(
                self.backbone,
                self.adapter,
                features,
                out,
                input_sizes,
                self.engine.mask_threshold,
                apm.box_refinement,
                apm.refinement_margin,
                self.engine.decode,
            )
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
        if out.apm is not None and out.apm.presence is not None:
            masks &= (out.apm.presence >= PRESENCE_THRESHOLD)[:, None, None]  # absent: left empty
        return masks.cpu().numpy()

    def is_automatic(self, mode: str) -> bool:
        """Whether ``mode`` segments every slice by itself (APM) rather than only prompted slices."""
        return self.has_apm and mode in ("auto",) + APM_MODES

    def segment_volume(self, volume: np.ndarray, ijk_to_ras: np.ndarray, *, mode: str = "auto", **kwargs) -> np.ndarray:
        """Volume (KJI, or KJI x 3 RGB) at ``ijk_to_ras`` -> uint8 KJI mask on the same grid; see
        ``volume_segmentation.segment_volume`` for the other arguments (axis, slice_range, prompts in each
        slice's pixels, progress, cancel). The adapter's intensity rule applies unless one is given."""
        kwargs.setdefault("intensity", self.intensity)
        kwargs.setdefault("box_propagation", self.backbone.spec.box_only)
        return segment_volume(self.in_mode(mode), volume, ijk_to_ras, automatic=self.is_automatic(mode), **kwargs)

    def in_mode(self, mode: str = "auto") -> "ModelInMode":
        """This model fixed to one mode: a ``volume_segmentation.SliceModel`` for the volume loop."""
        return ModelInMode(self, mode)

    def segment_slice(
        self,
        volume: np.ndarray,
        ijk_to_ras: np.ndarray,
        axis,
        index: int,
        prompts: Optional[Prompts] = None,
        previous_mask: Optional[np.ndarray] = None,
        mode: str = "auto",
        value_range=None,
    ) -> Prediction:
        """Slice ``index`` along ``axis`` -> ``Prediction`` on that slice's native grid (rows, columns as
        ``take_slice`` gives them); ``prompts`` in that slice's pixels (x = column, y = row)."""
        return segment_slice(
            self.in_mode(mode), volume, ijk_to_ras, axis, index, prompts, previous_mask, self.intensity, value_range
        )


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


def engine_for(
    backbone: LoadedBackbone,
    adapter: Optional[Adapter],
    device=None,
    batch_size=None,
    cache=None,
    precision: str = "auto",
    threads: Optional[int] = None,
    runtime: Optional[str] = None,
) -> InferenceEngine:
    """The engine users get: ``precision="auto"`` is the fastest mode measured to agree with fp32
    (``acceleration``); ``runtime`` None: ``$PROMISE_SEGMENT_RUNTIME``, else ``auto`` (OpenVINO's encoder on
    CPUs where installed and measured). It captures the encoder taps when the adapter has an APM."""
    return InferenceEngine(
        backbone,
        device=device,
        batch_size=batch_size,
        capture_taps=adapter is not None and adapter.apm is not None,
        cache=cache,
        precision=precision,
        threads=threads,
        runtime=runtime or os.environ.get(RUNTIME_ENV) or "auto",
    )


def load_model(
    backbone: Optional[str] = None,
    adapter_path: Optional[str] = None,
    device: Optional[str] = None,
    allow_mismatch: bool = False,
    batch_size: Optional[int] = None,
    precision: str = "auto",
    threads: Optional[int] = None,
    runtime: Optional[str] = None,
) -> ProMISeModel:
    """Backbone (registry name or checkpoint path; ``None``: the adapter's backbone, else the default) plus
    an optional adapter file. The adapter's metadata is read first, so a mismatch is reported before any
    weights are loaded."""
    expected = read_metadata(adapter_path).backbone.name if adapter_path else None
    loaded = load_backbone(backbone or expected, expected)
    adapter = load_adapter(adapter_path, loaded, allow_mismatch) if adapter_path else None
    engine = engine_for(loaded, adapter, device, batch_size, precision=precision, threads=threads, runtime=runtime)
    return ProMISeModel(engine, adapter)
