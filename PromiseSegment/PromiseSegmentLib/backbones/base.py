"""Backbones: everything that differs between the frozen SAM-family models, behind one interface.

A ``Backbone`` is a stateless description (identity, checkpoint, geometry, how to encode and which
mask token ProMISe decodes); ``LoadedBackbone`` is one with its verified weights in memory. The
engine, the APM, training, adapters, the command line and the Slicer lists are all built from the
``BACKBONES`` registry, so adding a backbone is one module plus one registry entry.

Frames: an image (H, W, 3) uint8 is resized so its longest side is ``image_size`` (the *input
frame*, size ``input_size``), normalised and zero-padded bottom/right to ``image_size`` squared.
Prompts given to the prompt encoder are in that padded input frame; low-res logits are 256x256 and
cover the whole padded square.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam

from PromiseSegmentLib.backbones.checkpoints import CheckpointInfo
from PromiseSegmentLib.callbacks import ProgressFn
from PromiseSegmentLib.errors import CheckpointError

LOW_RES = 256  # SAM's decoder always predicts 256x256 logits over the padded input square


@dataclass
class LoadedBackbone:
    """A backbone's frozen model with its identity (the SHA-256 of the weights it was loaded from,
    or a seed tag for the test fixture), which adapters record to refuse another backbone."""

    spec: "Backbone"
    sam: Sam
    identity: str
    path: Optional[Path] = None
    rewrites: List[str] = field(default_factory=list)  # load-time speed-ups (``Backbone.optimise``), in words
    half_decoders: dict = field(default_factory=dict, repr=False)  # (dtype, device) -> ``decoder.HalfDecoder``
    openvino_encoders: dict = field(default_factory=dict, repr=False)  # (precision, threads) -> OpenVinoEncoder

    @property
    def name(self) -> str:
        return self.spec.name


class Backbone:
    """Base class: SAM's own geometry (ResizeLongestSide + ``Sam.preprocess``), subclassed per family."""

    name: str = ""
    family: str = ""
    description: str = ""
    image_size: int = 1024
    mask_token: int = 1  # which of the decoder's 4 mask tokens ProMISe decodes (0 = the single-mask output)
    apm_prompts: Tuple[str, ...] = ("points",)  # what an APM predicts by default on this backbone
    tap_channels: Tuple[int, ...] = ()  # channels of the encoder taps the APM reads, each (B, C, 64, 64)
    user_visible: bool = True  # False: a test fixture, never listed for users
    box_only: bool = False  # True: points alone do not segment (trained on boxes only)
    cpu_bf16: bool = False  # bf16 masks measured to agree with fp32 (Dice >= 0.99): ``auto`` may use bf16 on CPUs
    channels_last: bool = False  # the encoder is convolutional enough to prefer NHWC inputs
    openvino_measured: bool = False  # its encoder measured faster and agreeing in OpenVINO: ``auto`` may use it
    encode_bytes_per_image: int = 2 << 30  # estimated device memory per image in the fp32 encoder (batch sizing;
    # SAM ViT: global attention holds a 64x64-token bias per head)

    def encode_bytes(self, reduced_precision: bool) -> int:
        """Estimated device memory per image in the encoder, for batch sizing: half the fp32 estimate when
        it runs in bf16/fp16."""
        return self.encode_bytes_per_image // (2 if reduced_precision else 1)

    # ------------------------------------------------------------------ identity and weights
    @property
    def checkpoint(self) -> Optional[CheckpointInfo]:
        return None

    def build(self) -> Sam:
        """The architecture with untrained weights (train mode; ``load`` switches to eval after loading)."""
        raise NotImplementedError

    def recognises(self, state: Mapping[str, torch.Tensor]) -> bool:
        """Whether a state dict holds this backbone's weights (used to identify a user's file)."""
        raise NotImplementedError

    def locate(self, progress: Optional[ProgressFn] = None, cancel=None) -> Path:
        """The verified checkpoint file (downloaded into the user cache or found in a package)."""
        from PromiseSegmentLib.backbones.checkpoints import ensure_checkpoint

        if self.checkpoint is None:
            raise CheckpointError(f"backbone {self.name} has no registered checkpoint; pass a file path")
        return ensure_checkpoint(self.checkpoint, progress, cancel=cancel)

    def load(
        self, path: Optional[Path] = None, progress: Optional[ProgressFn] = None, cancel=None, optimise: bool = True
    ) -> LoadedBackbone:
        """Build, load verified weights (``weights_only``), then ``eval()`` - in that order: some encoders
        (TinyViT) cache derived tensors when switched to eval mode - then ``optimise`` the model in memory
        (the file is never changed)."""
        from PromiseSegmentLib.backbones.checkpoints import file_sha256, load_state_dict

        path = Path(path) if path is not None else self.locate(progress, cancel)
        state = load_state_dict(path)
        if not self.recognises(state):
            raise CheckpointError(f"{path} does not hold {self.description} weights")
        sam = self.build()
        try:
            sam.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            raise CheckpointError(f"{path} does not fit the {self.name} architecture: {first}") from exc
        sam = freeze(sam.eval())
        rewrites = self.optimise(sam) if optimise else []
        return LoadedBackbone(self, sam, file_sha256(path), path, rewrites)

    def optimise(self, sam: Sam) -> List[str]:
        """Rewrite the frozen, loaded model for speed without changing its fp32 outputs beyond float
        rounding (e.g. BatchNorm folded into convs); returns what was done, in words."""
        from PromiseSegmentLib.backbones.decoder_rewrites import optimise_sam_decoder

        return optimise_sam_decoder(sam)

    # ------------------------------------------------------------------ geometry
    def input_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        """(rows, cols) after resizing the longest side to ``image_size`` (SAM's rounding rule)."""
        h, w = original_size
        s = self.image_size / max(h, w)
        return int(h * s + 0.5), int(w * s + 0.5)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (h, w, 3) in the input frame (SAM: PIL resize, as ResizeLongestSide)."""
        from segment_anything.utils.transforms import ResizeLongestSide

        return ResizeLongestSide(self.image_size).apply_image(image)

    def prepare(self, sam: Sam, image: np.ndarray, device) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """uint8 RGB (H, W, 3) -> the model's input (1, 3, S, S) on ``device`` and the unpadded input size."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
        resized = self.resize(image)
        t = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None]
        pinned = torch.device(device).type == "cuda"  # pinned host memory: the copy overlaps the GPU's work
        t = (t.pin_memory() if pinned else t).to(device, non_blocking=pinned)
        return sam.preprocess(t.float()), (int(resized.shape[0]), int(resized.shape[1]))

    def to_input_frame(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """(..., 2) pixel coordinates (x, y) of the original image -> the input frame (SAM's apply_coords)."""
        return self._rescale(coords, original_size, inverse=False)

    def from_input_frame(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """The inverse of ``to_input_frame``."""
        return self._rescale(coords, original_size, inverse=True)

    def _rescale(self, coords: np.ndarray, original_size: Tuple[int, int], inverse: bool) -> np.ndarray:
        h, w = original_size
        nh, nw = self.input_size(original_size)
        sx, sy = (w / nw, h / nh) if inverse else (nw / w, nh / h)
        c = np.array(coords, dtype=float, copy=True)
        c[..., 0] *= sx
        c[..., 1] *= sy
        return c

    # ------------------------------------------------------------------ encoding
    def encode(self, sam: Sam, x: torch.Tensor, taps: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """(B, 3, S, S) -> image embedding (B, 256, 64, 64) and, if ``taps``, the APM's encoder taps,
        each (B, C, 64, 64) with C from ``tap_channels``."""
        raise NotImplementedError

    @property
    def fp32_head(self) -> bool:
        """The encoder's first layers (``encode_head``) stay in fp32 under any reduced precision: rounding
        there is amplified by every later layer."""
        return False

    def encode_head(self, sam: Sam, x: torch.Tensor) -> torch.Tensor:
        """The first layers of ``encode`` (the rest: ``encode_tail``); nothing where ``fp32_head`` is False."""
        return x

    def encode_tail(self, sam: Sam, x: torch.Tensor, taps: bool) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``encode`` after ``encode_head``."""
        return self.encode(sam, x, taps)

    def vanilla_multimask(self, n_points: int, has_box: bool) -> bool:
        """Plain backbone, no adapter: ask for 3 masks and keep the best (SAM's rule for one click)?"""
        return n_points == 1 and not has_box


def freeze(sam: Sam) -> Sam:
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam


def pad_to_square(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return F.pad(x, (0, size - w, 0, size - h))
