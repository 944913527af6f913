"""Inference engine: a frozen backbone, batched image encoding (with the APM's encoder taps), and
prompted mask prediction.

The backbone owns the geometry (resize, normalisation, padding, coordinate transforms) and the
encoder; for SAM ViT these are SAM's own, so with the same weights and prompts the engine reproduces
``SamPredictor`` (oracle tests), and for LiteMedSAM the package's own forward. The decoder goes
through ``decoder.decode_masks``, which accepts IPS's mask-token shift.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from PromiseSegmentLib.backbones.base import LOW_RES, LoadedBackbone
from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.errors import Cancelled
from PromiseSegmentLib.inference.acceleration import (
    Precision,
    after_out_of_memory,
    auto_batch_size,
    configure_threads,
    cpu_clone,
    resolve_precision,
)
from PromiseSegmentLib.inference.devices import is_out_of_memory, pick_device
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache, lookup
from PromiseSegmentLib.inference.heap import keep_freed_memory
from PromiseSegmentLib.inference.openvino_runtime import OpenVinoEncoder, resolve_runtime
from PromiseSegmentLib.model.decoder import HalfDecoder, decode_masks

log = logging.getLogger(__name__)

MASK_PROMPT_LOGIT = 10.0  # magnitude of the logits a binary mask prompt is turned into


@dataclass
class PromptBatch:
    """Prompts for B images in the backbone's input frame: points (B, M, 2) as (x, y) with labels (B, M)
    (1 positive, 0 negative, -1 padding), boxes (B, 4) as (x0, y0, x1, y1), mask logits (B, 1, 256, 256)."""

    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    boxes: Optional[torch.Tensor] = None
    masks: Optional[torch.Tensor] = None

    @property
    def point_pairs(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(points, labels)`` as SAM's prompt encoder takes them, or None."""
        return None if self.points is None or self.labels is None else (self.points, self.labels)


@dataclass
class ImageEmbedding:
    """One encoded image: ``features`` (1, 256, 64, 64) on the engine's device; ``input_size`` (rows,
    cols) after resizing to the backbone's input frame, before padding; ``original_size`` of the image
    that was encoded; ``taps`` the APM's encoder taps, each (1, C, 64, 64), when captured."""

    features: torch.Tensor
    input_size: Tuple[int, int]
    original_size: Tuple[int, int]
    taps: Optional[List[torch.Tensor]] = None


@dataclass
class Prediction:
    masks: np.ndarray  # bool (C, H, W) at the requested output size
    logits: np.ndarray  # float32 (C, H, W)
    iou: np.ndarray  # (C,)
    low_res: np.ndarray  # (C, 256, 256), reusable as a mask prompt
    points: Optional[np.ndarray] = None  # prompts actually used (APM's included), image pixels
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None  # (4,) x0, y0, x1, y1 actually used, image pixels

    def best(self) -> int:
        return int(np.argmax(self.iou))


def mask_to_low_res(mask: np.ndarray, input_size: Tuple[int, int], image_size: int = 1024) -> torch.Tensor:
    """A mask on an image's grid -> (1, 256, 256) coverage in [0, 1] in the decoder's frame: resized
    like the image (ResizeLongestSide), padded to the square input, area-averaged."""
    t = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None, None]
    t = F.interpolate(t, tuple(input_size), mode="bilinear", align_corners=False)
    t = F.pad(t, (0, image_size - input_size[1], 0, image_size - input_size[0]))
    return F.interpolate(t, (LOW_RES, LOW_RES), mode="area")[0]


class InferenceEngine:
    """A frozen backbone on a device: ``encode`` images (batched, cached) and ``predict`` masks from prompts
    given in each image's own pixels.

    ``precision`` (``acceleration.PRECISIONS``): ``fp32`` (the default: the reference numerics), ``bf16``/
    ``fp16`` autocast, or ``auto`` (the fastest that is supported and measured to agree; what users should
    get). ``batch_size`` None: 1 on a CPU, sized from free memory on CUDA. ``threads``: PyTorch's compute
    threads (None: PyTorch's choice, capped at the CPUs this process may use). ``runtime``
    (``openvino_runtime.resolve_runtime``): the encoder in PyTorch (the default here) or OpenVINO (CPUs;
    ``auto`` where installed and measured). ``describe()`` says what runs.
    """

    def __init__(
        self,
        backbone: LoadedBackbone,
        device: Optional[str] = None,
        batch_size: Optional[int] = None,
        capture_taps: bool = False,
        cache: Optional[EmbeddingCache] = None,
        precision: str = "fp32",
        threads: Optional[int] = None,
        runtime: str = "torch",
    ):
        self.cache = cache  # optional: repeated slices skip the encoder
        self.backbone = backbone
        self.spec = backbone.spec
        self.device = pick_device(device)
        self.sam = backbone.sam.to(self.device)
        self.threads = configure_threads(threads)
        self.heap = keep_freed_memory()  # process-wide, once: slices reuse freed memory without page faults
        self.requested_precision = precision
        self.precision = resolve_precision(precision, self.device, self.spec.cpu_bf16)
        self.batch_size = batch_size or auto_batch_size(self.device, self._bytes_per_image())
        self.capture_taps = capture_taps
        self.mask_threshold = float(backbone.sam.mask_threshold)
        self._cpu_encoder: Optional[Tuple[torch.nn.Module, Precision]] = None  # after GPU out-of-memory
        self.runtime, self.runtime_note = resolve_runtime(runtime, self.device, backbone)
        self.runtime_requested = runtime
        self._openvino: Optional[OpenVinoEncoder] = None  # built at first use (``prepare_runtime``)
        log.info("%s", self.describe())

    # ----------------------------------------------------------------------------- what runs
    @property
    def precision_summary(self) -> str:
        """Short: device and precision, e.g. ``cpu bf16``."""
        return f"{self.device.type} {self.precision.name}"

    def describe(self) -> str:
        """One line for the user: backbone, device, threads, precision (and why), load-time rewrites, batch."""
        where = f"{self.device}" + (f", {self.threads} threads" if self.device.type == "cpu" else "")
        parts = [f"{self.spec.name} on {where}: {self.precision.name} ({self.precision.note})"]
        if self.backbone.rewrites:
            parts.append(", ".join(self.backbone.rewrites))
        parts.append(f"encoder in {'OpenVINO' if self.runtime == 'openvino' else 'PyTorch'} ({self.runtime_note})")
        parts.append(f"batch {self.batch_size}")
        parts.append(self.heap)
        if self._cpu_encoder is not None:
            parts.append(f"encoder on the CPU ({self._cpu_encoder[1].name}) after GPU out-of-memory")
        return "; ".join(parts)

    def autocast(self):
        """The engine's precision as an autocast context on its device (the encoder runs in it; the mask
        decoder has ``decode``). Keep prompt encoding and the APM's box outside it: bf16 would round box
        corners to about a pixel."""
        return self.precision.autocast(self.device)

    def decode(
        self,
        features: torch.Tensor,
        sparse: torch.Tensor,
        dense: torch.Tensor,
        multimask_output: bool,
        mask_token_shift: Optional[torch.Tensor] = None,
        token: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``decode_masks`` in the engine's precision, fp32 logits out: the decoder itself in fp32, or its
        bf16/fp16 copy (``HalfDecoder``, made once per backbone and device). Prompt embeddings come in
        fp32, so box corners are encoded exactly."""
        dtype = self.precision.dtype
        if dtype is None:
            return decode_masks(self.sam, features, sparse, dense, multimask_output, mask_token_shift, token)
        key = (dtype, str(self.device))
        if key not in self.backbone.half_decoders:
            self.backbone.half_decoders[key] = HalfDecoder(self.sam, dtype)
        return self.backbone.half_decoders[key](
            self.sam, features, sparse, dense, multimask_output, mask_token_shift, token
        )

    def _bytes_per_image(self) -> int:
        return self.spec.encode_bytes(self.precision.dtype is not None)

    # ----------------------------------------------------------------------------- encoding
    def _prepare(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        x, input_size = self.spec.prepare(self.sam, image, self.device)
        return x, input_size, (int(image.shape[0]), int(image.shape[1]))

    def prepare_runtime(self) -> Optional[float]:
        """Make the OpenVINO encoder now (converted at first use, then read from the cache); returns the
        seconds a conversion took, or None. Under ``auto`` a model that does not convert falls back to
        PyTorch with a warning; asked for explicitly, that is an error."""
        if self.runtime != "openvino" or self._openvino is not None:
            return None
        key = (self.precision.name, self.threads)  # one per backbone: engines come and go (Slicer)
        try:
            made = key not in self.backbone.openvino_encoders
            if made:
                self.backbone.openvino_encoders[key] = OpenVinoEncoder(self.backbone, *key)
            self._openvino = self.backbone.openvino_encoders[key]
        except Exception as exc:  # OpenVINO's conversion errors have no common type
            if self.runtime_requested == "openvino":
                raise RuntimeError(f"the {self.spec.name} encoder could not be converted to OpenVINO: {exc}") from exc
            log.warning("OpenVINO could not convert the %s encoder (%s); using PyTorch", self.spec.name, exc)
            self.runtime, self.runtime_note = "torch", "OpenVINO conversion failed"
            return None
        return self._openvino.conversion_seconds if made else None

    @torch.no_grad()
    def _encode_batch(self, batch: torch.Tensor):
        """(features, taps) on the engine's device in fp32, whatever precision the encoder ran in."""
        sam, device, precision = self.sam, self.device, self.precision
        if self._cpu_encoder is not None:
            (sam, precision), device = self._cpu_encoder, torch.device("cpu")
        self.prepare_runtime()
        if self._openvino is not None:
            feats, taps = self._openvino(batch)
            return self._in_engine_layout(feats, taps if self.capture_taps else [])
        x = batch.to(device)
        if self.spec.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with precision.autocast(device):
            feats, taps = self.spec.encode(sam, x, self.capture_taps)
        return self._in_engine_layout(feats, taps)

    def _in_engine_layout(self, feats: torch.Tensor, taps: List[torch.Tensor]):
        """fp32 on the engine's device."""
        # NHWC (channels_last), as the encoders make them: the APM's pooling and the decoder read it without copies
        back = lambda t: t.to(self.device, torch.float32).contiguous(  # noqa: E731
            memory_format=torch.channels_last if t.dim() == 4 else torch.contiguous_format
        )
        return back(feats), [back(t) for t in taps]

    def encode(
        self, images: Sequence[np.ndarray], progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None
    ) -> List[ImageEmbedding]:
        """Encode uint8 RGB images, ``batch_size`` at a time; on out-of-memory the batch is halved and, on a
        GPU at batch 1, the encoder continues on a CPU copy (the shared model and the decoder stay put)."""
        out: List[Optional[ImageEmbedding]] = [None] * len(images)
        keys: List[Optional[str]] = [None] * len(images)
        todo = []
        for n, image in enumerate(images):
            keys[n], out[n] = lookup(
                self.cache, image, (self.spec.name, self.capture_taps, self.precision.name, self.runtime)
            )
            if out[n] is None:
                todo.append(n)
        i = 0
        while i < len(todo):
            if cancel is not None and cancel():
                raise Cancelled()
            chunk = todo[i : i + self.batch_size]
            prepared = [self._prepare(images[n]) for n in chunk]
            try:
                feats, taps = self._encode_batch(torch.cat([p[0] for p in prepared]))
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                self._shrink_after_oom()
                continue
            for j, (n, (_, input_size, original_size)) in enumerate(zip(chunk, prepared)):
                out[n] = ImageEmbedding(
                    feats[j : j + 1], input_size, original_size, [t[j : j + 1] for t in taps] if taps else None
                )
                key = keys[n]
                if self.cache is not None and key is not None:
                    self.cache.put(key, out[n])
            i += len(chunk)
            if progress:
                progress(i, len(todo))
        return out  # type: ignore[return-value]

    def _shrink_after_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        on_cpu = self.device.type == "cpu" or self._cpu_encoder is not None
        self.batch_size, to_cpu = after_out_of_memory(self.batch_size, on_cpu)
        if to_cpu and not on_cpu:
            log.warning("GPU out of memory even at batch 1: encoding on the CPU from now on (slower)")
            cpu = torch.device("cpu")
            self._cpu_encoder = (
                cpu_clone(self.sam),
                resolve_precision(self.requested_precision, cpu, self.spec.cpu_bf16),
            )
        else:
            log.warning("out of memory: encoding batch reduced to %d", self.batch_size)

    # ----------------------------------------------------------------------------- prompts
    def prompt_tensors(self, emb: ImageEmbedding, prompts: Prompts) -> PromptBatch:
        """One image's prompts in the backbone's input frame, as ``SamPredictor.predict`` builds them."""
        batch = PromptBatch()
        if prompts.points is not None and len(prompts.points):
            coords = self.spec.to_input_frame(prompts.points, emb.original_size)
            batch.points = torch.as_tensor(coords, dtype=torch.float, device=self.device)[None]
            batch.labels = torch.as_tensor(prompts.labels, dtype=torch.int, device=self.device)[None]
        if prompts.box is not None:
            b = self.spec.to_input_frame(prompts.box.reshape(2, 2), emb.original_size).reshape(1, 4)
            batch.boxes = torch.as_tensor(b, dtype=torch.float, device=self.device)
        if prompts.mask_logits is not None:
            batch.masks = torch.as_tensor(prompts.mask_logits, dtype=torch.float, device=self.device).reshape(
                1, 1, LOW_RES, LOW_RES
            )
        return batch

    def mask_to_prompt(self, emb: ImageEmbedding, mask: np.ndarray) -> np.ndarray:
        """A binary mask on the encoded image's grid -> (1, 256, 256) logits usable as ``mask_logits``."""
        soft = mask_to_low_res(mask, emb.input_size, self.spec.image_size)
        return ((soft - 0.5) * (2 * MASK_PROMPT_LOGIT)).numpy()

    # ----------------------------------------------------------------------------- decoding
    def postprocess(
        self, low_res: torch.Tensor, emb: ImageEmbedding, output_size: Optional[Tuple[int, int]] = None
    ) -> torch.Tensor:
        """Low-res logits -> logits on the encoded image's grid (or ``output_size``, e.g. the native
        anisotropic slice grid, in a single interpolation)."""
        size = self.spec.image_size
        x = (
            low_res
            if low_res.shape[-1] == size
            else F.interpolate(low_res, (size, size), mode="bilinear", align_corners=False)
        )
        x = x[..., : emb.input_size[0], : emb.input_size[1]]
        return F.interpolate(x, tuple(output_size or emb.original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(
        self,
        emb: ImageEmbedding,
        prompts: Optional[Prompts] = None,
        multimask_output: bool = True,
        mask_token_shift: Optional[torch.Tensor] = None,
        output_size: Optional[Tuple[int, int]] = None,
    ) -> Prediction:
        prompts = prompts or Prompts()
        given = self.prompt_tensors(emb, prompts)  # the prompt encoder runs in fp32: exact box positions
        sparse, dense = self.sam.prompt_encoder(points=given.point_pairs, boxes=given.boxes, masks=given.masks)
        low_res, iou = self.decode(emb.features, sparse, dense, multimask_output, mask_token_shift)
        logits = self.postprocess(low_res, emb, output_size)
        return Prediction(
            masks=(logits > self.mask_threshold)[0].cpu().numpy(),
            logits=logits[0].float().cpu().numpy(),
            iou=iou[0].float().cpu().numpy(),
            low_res=low_res[0].float().cpu().numpy(),
            points=prompts.points,
            labels=prompts.labels,
        )
