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
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import LOW_RES, LoadedBackbone
from .decoder import decode_masks
from .devices import is_out_of_memory, pick_device
from .embedding_cache import EmbeddingCache, lookup
from .errors import Cancelled  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

MASK_PROMPT_LOGIT = 10.0  # magnitude of the logits a binary mask prompt is turned into


@dataclass
class Prompts:
    """Prompts for one image, in its pixel coordinates: points (N, 2) as (x, y), labels (N,) 1/0,
    box (4,) as x0, y0, x1, y1, and ``mask_logits`` (1, 256, 256) from an earlier prediction."""

    points: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    box: Optional[np.ndarray] = None
    mask_logits: Optional[np.ndarray] = None

    def __post_init__(self):
        if self.points is not None:
            self.points = np.asarray(self.points, float).reshape(-1, 2)
            self.labels = (np.ones(len(self.points), int) if self.labels is None
                           else np.asarray(self.labels, int).reshape(-1))
            if len(self.labels) != len(self.points):
                raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        if self.box is not None:
            self.box = np.asarray(self.box, float).reshape(4)

    @property
    def empty(self) -> bool:
        return self.points is None and self.box is None and self.mask_logits is None


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


class SamEngine:
    """A frozen backbone on a device: ``encode`` images (batched, cached) and ``predict`` masks from prompts
    given in each image's own pixels."""

    def __init__(self, backbone: LoadedBackbone, device: Optional[str] = None, batch_size: Optional[int] = None,
                 capture_taps: bool = False, cache: Optional[EmbeddingCache] = None):
        self.cache = cache  # optional: repeated slices skip the encoder
        self.backbone = backbone
        self.spec = backbone.spec
        self.device = pick_device(device)
        self.sam = backbone.sam.to(self.device)
        self.batch_size = batch_size or (4 if self.device.type == "cuda" else 1)
        self.capture_taps = capture_taps
        self.mask_threshold = float(backbone.sam.mask_threshold)

    # ----------------------------------------------------------------------------- encoding
    def _prepare(self, image: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int], Tuple[int, int]]:
        x, input_size = self.spec.prepare(self.sam, image, self.device)
        return x, input_size, (int(image.shape[0]), int(image.shape[1]))

    @torch.no_grad()
    def _encode_batch(self, batch: torch.Tensor):
        return self.spec.encode(self.sam, batch, self.capture_taps)

    def encode(self, images: Sequence[np.ndarray], progress: Optional[Callable[[int, int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None) -> List[ImageEmbedding]:
        """Encode uint8 RGB images, ``batch_size`` at a time; on GPU out-of-memory the batch is halved
        and, at batch 1, the model falls back to the CPU with a warning."""
        out: List[Optional[ImageEmbedding]] = [None] * len(images)
        keys: List[Optional[str]] = [None] * len(images)
        todo = []
        for n, image in enumerate(images):
            keys[n], out[n] = lookup(self.cache, image, (self.spec.name, self.capture_taps))
            if out[n] is None:
                todo.append(n)
        i = 0
        while i < len(todo):
            if cancel is not None and cancel():
                raise Cancelled()
            chunk = todo[i:i + self.batch_size]
            prepared = [self._prepare(images[n]) for n in chunk]
            try:
                feats, taps = self._encode_batch(torch.cat([p[0] for p in prepared]))
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                self._shrink_after_oom()
                continue
            for j, (n, (_, input_size, original_size)) in enumerate(zip(chunk, prepared)):
                out[n] = ImageEmbedding(feats[j:j + 1], input_size, original_size,
                                        [t[j:j + 1] for t in taps] if taps else None)
                if self.cache is not None:
                    self.cache.put(keys[n], out[n])
            i += len(chunk)
            if progress:
                progress(i, len(todo))
        return out  # type: ignore[return-value]

    def _shrink_after_oom(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch_size > 1:
            self.batch_size //= 2
            log.warning("GPU out of memory: encoding batch reduced to %d", self.batch_size)
        elif self.device.type != "cpu":
            log.warning("GPU out of memory even at batch 1: continuing on the CPU (slower)")
            self.device = torch.device("cpu")
            self.sam = self.sam.to(self.device)
            if self.cache is not None:  # cached embeddings live on the GPU
                self.cache.clear()
        else:
            raise MemoryError("out of memory on the CPU while encoding one image")

    # ----------------------------------------------------------------------------- prompts
    def prompt_tensors(self, emb: ImageEmbedding, prompts: Prompts):
        """Prompt-encoder inputs in the backbone's input frame, as ``SamPredictor.predict`` builds them."""
        points = box = mask = None
        if prompts.points is not None and len(prompts.points):
            coords = self.spec.to_input_frame(prompts.points, emb.original_size)
            points = (torch.as_tensor(coords, dtype=torch.float, device=self.device)[None],
                      torch.as_tensor(prompts.labels, dtype=torch.int, device=self.device)[None])
        if prompts.box is not None:
            b = self.spec.to_input_frame(prompts.box.reshape(2, 2), emb.original_size).reshape(1, 4)
            box = torch.as_tensor(b, dtype=torch.float, device=self.device)[None]
        if prompts.mask_logits is not None:
            mask = torch.as_tensor(prompts.mask_logits, dtype=torch.float, device=self.device).reshape(
                1, 1, LOW_RES, LOW_RES)
        return points, box, mask

    def mask_to_prompt(self, emb: ImageEmbedding, mask: np.ndarray) -> np.ndarray:
        """A binary mask on the encoded image's grid -> (1, 256, 256) logits usable as ``mask_logits``."""
        soft = mask_to_low_res(mask, emb.input_size, self.spec.image_size)
        return ((soft - 0.5) * (2 * MASK_PROMPT_LOGIT)).numpy()

    # ----------------------------------------------------------------------------- decoding
    def postprocess(self, low_res: torch.Tensor, emb: ImageEmbedding,
                    output_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Low-res logits -> logits on the encoded image's grid (or ``output_size``, e.g. the native
        anisotropic slice grid, in a single interpolation)."""
        size = self.spec.image_size
        x = low_res if low_res.shape[-1] == size else F.interpolate(low_res, (size, size), mode="bilinear",
                                                                     align_corners=False)
        x = x[..., :emb.input_size[0], :emb.input_size[1]]
        return F.interpolate(x, tuple(output_size or emb.original_size), mode="bilinear", align_corners=False)

    @torch.no_grad()
    def predict(self, emb: ImageEmbedding, prompts: Optional[Prompts] = None, multimask_output: bool = True,
                mask_token_shift: Optional[torch.Tensor] = None,
                output_size: Optional[Tuple[int, int]] = None) -> Prediction:
        prompts = prompts or Prompts()
        points, box, mask = self.prompt_tensors(emb, prompts)
        sparse, dense = self.sam.prompt_encoder(points=points, boxes=box, masks=mask)
        low_res, iou = decode_masks(self.sam, emb.features, sparse, dense, multimask_output, mask_token_shift)
        logits = self.postprocess(low_res, emb, output_size)
        return Prediction(masks=(logits > self.mask_threshold)[0].cpu().numpy(),
                          logits=logits[0].float().cpu().numpy(), iou=iou[0].float().cpu().numpy(),
                          low_res=low_res[0].float().cpu().numpy(),
                          points=prompts.points, labels=prompts.labels)
