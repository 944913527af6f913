"""ProMISe = frozen SAM + optional APM/IPS adapter. One ``predict`` call serves every mode:

- ``apm+ips``    automatic: APM points, IPS shift, no user input
- ``ips``        user points/box (and mask) with the IPS shift
- ``apm+clicks`` APM points merged with the user's clicks, IPS shift
- ``vanilla``    SAM alone with user prompts
- ``auto``       picks from the above by what is available
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from .adapter import Adapter, load_adapter
from .checkpoints import load_backbone
from .decoder import decode_masks
from .engine import ImageEmbedding, Prediction, Prompts, SamEngine
from .preprocessing import InputError, IntensityRule
from .sam_models import ARCHITECTURES
from .volume_segmentation import segment_slice, segment_volume, vanilla_predict

MODES = ("auto", "apm+ips", "ips", "apm+clicks", "vanilla")


def promise_low_res(sam, adapter: Adapter, features: torch.Tensor, block_features, points=None, labels=None,
                    boxes=None) -> torch.Tensor:
    """Batched, differentiable ProMISe forward used by training: first multimask output (B, 256, 256).

    ``points``/``labels`` (B, M, 2)/(B, M) in the 1024 frame are used instead of APM's when given
    (e.g. ground-truth points for the IPS-only configuration).
    """
    if points is None and adapter.apm is not None:
        points, labels = adapter.apm(block_features)
    sparse, dense = sam.prompt_encoder(points=None if points is None else (points, labels), boxes=boxes,
                                       masks=None)
    if sparse.shape[0] != features.shape[0]:  # no prompts at all: SAM's encoder returns a batch of one
        sparse = sparse.expand(features.shape[0], -1, -1)
        dense = dense.expand(features.shape[0], -1, -1, -1)
    shift = adapter.ips(features) if adapter.ips is not None else None
    low_res, _ = decode_masks(sam, features, sparse, dense, True, shift)
    return low_res[:, 0]


class ProMISeModel:
    def __init__(self, engine: SamEngine, variant: str, identity: str, adapter: Optional[Adapter] = None):
        self.engine, self.variant, self.identity, self.adapter = engine, variant, identity, adapter
        if adapter is not None:
            adapter.to(engine.device).eval()

    @property
    def intensity(self) -> IntensityRule:
        return self.adapter.intensity if self.adapter else IntensityRule()

    @property
    def target_name(self) -> str:
        return self.adapter.target_name if self.adapter else "Segment"

    @property
    def target_color(self) -> Tuple[float, float, float]:
        return tuple(self.adapter.target_color) if self.adapter else (0.9, 0.3, 0.2)

    @property
    def has_apm(self) -> bool:
        return self.adapter is not None and self.adapter.apm is not None

    def resolve_mode(self, mode: str, prompts: Prompts) -> str:
        if mode not in MODES:
            raise InputError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        if mode == "auto":
            if self.adapter is None:
                return "vanilla"
            if prompts.empty:
                return "apm+ips"
            return "apm+clicks" if self.has_apm and prompts.box is None else "ips"
        if mode != "vanilla" and self.adapter is None:
            raise InputError(f"mode {mode} needs an adapter; load one or use vanilla")
        if mode in ("apm+ips", "apm+clicks") and not self.has_apm:
            raise InputError(f"mode {mode} needs an adapter with an APM; this one has IPS only")
        return mode

    @torch.no_grad()
    def predict(self, emb: ImageEmbedding, prompts: Optional[Prompts] = None, output_size=None,
                mode: str = "auto") -> Prediction:
        """One slice: ``prompts`` in the encoded image's pixels; masks at ``output_size`` (default image grid)."""
        prompts = prompts or Prompts()
        mode = self.resolve_mode(mode, prompts)
        output_size = output_size or emb.original_size
        if mode == "vanilla":
            return vanilla_predict(self.engine, emb, prompts, output_size)
        if mode == "ips" and prompts.empty:
            raise InputError("mode ips needs user prompts (points or a box)")
        if mode in ("apm+ips", "apm+clicks"):
            if emb.interm is None:
                raise RuntimeError("the engine did not capture encoder blocks for the APM")
            pts, _ = self.adapter.apm(emb.interm)
            pts = pts[0].float().cpu().numpy()
            scale = np.array([emb.original_size[1] / emb.input_size[1], emb.original_size[0] / emb.input_size[0]])
            apm_points, apm_labels = pts * scale, self.adapter.apm.labels.cpu().numpy()
            if mode == "apm+clicks" and prompts.points is not None:
                prompts = Prompts(np.concatenate([apm_points, prompts.points]),
                                  np.concatenate([apm_labels, prompts.labels]), prompts.box, prompts.mask_logits)
            else:
                prompts = Prompts(apm_points, apm_labels, prompts.box, prompts.mask_logits)
        shift = self.adapter.ips(emb.features) if self.adapter.ips is not None else None
        pred = self.engine.predict(emb, prompts, multimask_output=True, mask_token_shift=shift,
                                   output_size=output_size)
        return Prediction(pred.masks[:1], pred.logits[:1], pred.iou[:1], pred.low_res[:1], prompts.points,
                          prompts.labels)

    def segment_volume(self, volume, ijk_to_ras, mode: str = "auto", **kwargs) -> np.ndarray:
        """Volume -> uint8 KJI mask (see ``volume_segmentation.segment_volume`` for the arguments)."""
        automatic = self.has_apm and mode in ("auto", "apm+ips", "apm+clicks")
        kwargs.setdefault("intensity", self.intensity)
        return segment_volume(self.engine, volume, ijk_to_ras, automatic=automatic,
                              predictor=self.predictor(mode), **kwargs)

    def predictor(self, mode: str = "auto"):
        """This model as a slice predictor for ``volume_segmentation`` (one mode for every slice)."""
        return lambda engine, emb, prompts, size: self.predict(emb, prompts, size, mode)

    def segment_slice(self, volume, ijk_to_ras, axis, index, prompts=None, previous_mask=None, mode="auto",
                      value_range=None) -> Prediction:
        return segment_slice(self.engine, volume, ijk_to_ras, axis, index, prompts, previous_mask,
                             self.intensity, value_range, self.predictor(mode))


def engine_for(sam, variant: str, adapter: Optional[Adapter], device=None, batch_size=None,
               cache=None) -> SamEngine:
    blocks = ARCHITECTURES[variant].apm_blocks if adapter is not None and adapter.apm is not None else ()
    return SamEngine(sam, device=device, batch_size=batch_size, capture_blocks=blocks, cache=cache)


def load_model(sam_checkpoint: Optional[str] = None, adapter_path: Optional[str] = None,
               variant: Optional[str] = None, device: Optional[str] = None, allow_mismatch: bool = False,
               batch_size: Optional[int] = None) -> ProMISeModel:
    adapter = None
    if adapter_path:  # read metadata first: a mismatch is reported before loading gigabytes of SAM
        from .adapter import read_metadata

        variant = variant or read_metadata(adapter_path)["sam_variant"]
    sam, variant, identity = load_backbone(sam_checkpoint, variant)
    if adapter_path:
        adapter = load_adapter(adapter_path, variant, identity, allow_mismatch)
    return ProMISeModel(engine_for(sam, variant, adapter, device, batch_size), variant, identity, adapter)
