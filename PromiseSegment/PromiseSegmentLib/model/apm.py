"""Auto-Prompting Module: the backbone's encoder taps -> prompts in the backbone's input frame.

Two heads, chosen per adapter (``prompts``):
- ``points`` (the ProMISe paper, for SAM ViT): a ResNet-style trunk, global pooling and a linear layer
  -> N points with fixed slot labels (first positives, then negatives).
- ``box`` (for box-trained backbones such as LiteMedSAM): a *localised*, translation-equivariant head.
  Every cell of the fused feature map predicts an objectness logit and its distances to the four box
  edges; the box is the objectness-softmax-weighted average of the cells' boxes, so it moves with
  the object (a global-pooling head predicted the same box for every image). Corners are sorted
  (x0 <= x1, y0 <= y1) and scaled to the input frame.
A presence logit (is the target on this image at all?) lets automatic runs leave empty slices empty.
Gradients from the mask loss reach the APM through the frozen prompt encoder and mask decoder;
training may add an auxiliary loss on the box and objectness (``training.TrainConfig``).
"""

from __future__ import annotations

import reprlib
from dataclasses import asdict, dataclass, replace
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from PromiseSegmentLib.model.module_configs import ApmConfig
from PromiseSegmentLib.names import RESNET34_BLOCKS

PROMPT_KINDS = ("points", "box")
MAX_REFINEMENT = 3
# Bounds on an APM's sizes (an adapter file's metadata is untrusted): the largest APM they allow, on ViT-H's
# taps, has about 180 M parameters (0.7 GB), so a hostile width cannot ask for gigabytes.
MAX_TAPS, MAX_TAP_CHANNELS, MAX_IMAGE_SIZE, MAX_SLOTS = 8, 4096, 4096, 256
MAX_FUSION_DIM, MAX_HEAD_BLOCKS, MAX_TAP_POOL = 1024, 16, 64


def default_slot_labels(n_points: int, n_positive: int) -> List[int]:
    return [1] * n_positive + [0] * (n_points - n_positive)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(value, name: str, low: int, high: int) -> None:
    if not (_is_int(value) and low <= value <= high):
        raise ValueError(f"APM {name} must be an integer in {low}..{high}, got {reprlib.repr(value)}")


def _check_ints(values, name: str, low: int, high: int, counts: range) -> None:
    if not (
        isinstance(values, (list, tuple))
        and len(values) in counts
        and all(_is_int(v) and low <= v <= high for v in values)
    ):
        n = f"{counts.start}" if len(counts) == 1 else f"{counts.start}..{counts.stop - 1}"
        raise ValueError(f"APM {name} must be {n} integers in {low}..{high}, got {reprlib.repr(values)}")


def check_config(tap_channels, image_size, prompts, slot_labels, fusion_dim, head_blocks, tap_pool) -> None:
    """Refuse an APM configuration that cannot be built or would be absurdly large (e.g. an edited adapter
    file), before a single layer is allocated."""
    _check_ints(tap_channels, "tap_channels", 1, MAX_TAP_CHANNELS, range(1, MAX_TAPS + 1))
    _check_int(image_size, "image_size", 1, MAX_IMAGE_SIZE)
    _check_int(fusion_dim, "fusion_dim", 1, MAX_FUSION_DIM)
    _check_int(tap_pool, "tap_pool", 1, MAX_TAP_POOL)
    _check_ints(head_blocks, "head_blocks", 1, MAX_HEAD_BLOCKS, range(4, 5))
    if (
        not isinstance(prompts, (list, tuple))
        or not prompts
        or any(not isinstance(p, str) or p not in PROMPT_KINDS for p in prompts)
    ):
        raise ValueError(f"APM prompts must be some of {PROMPT_KINDS}, got {reprlib.repr(prompts)}")
    _check_ints(slot_labels, "slot_labels", 0, 1, range(1 if "points" in prompts else 0, MAX_SLOTS + 1))


@dataclass
class ApmOutput:
    """APM prompts for B images in the input frame: points (B, N, 2) as (x, y) with labels (B, N), box
    (B, 4) as (x0, y0, x1, y1); objectness (B, 1, h, w) logits of the box head; presence (B,) logits."""

    points: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    box: Optional[torch.Tensor] = None
    objectness: Optional[torch.Tensor] = None
    presence: Optional[torch.Tensor] = None


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class PointHead(nn.Module):
    """The paper's head: 3x3 stem, ResNet stages, global pooling, linear -> N points (sigmoid x size)."""

    def __init__(self, dim: int, n_points: int, head_blocks: Sequence[int]):
        super().__init__()
        layers: List[nn.Module] = [
            nn.Conv2d(dim, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        ]
        cin = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), head_blocks)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (b == 0 and stage > 0) else 1))
                cin = width
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.linear = nn.Linear(cin, 2 * n_points)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(self.trunk(x))).view(x.shape[0], -1, 2)  # in [0, 1]


class BoxHead(nn.Module):
    """Per-cell objectness + distances to the box edges; the box is their objectness-weighted mean."""

    def __init__(self, dim: int):
        super().__init__()
        # Dilated context: a cell inside a large object must see its edges.
        self.body = nn.Sequential(
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=2, dilation=2),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 3, padding=4, dilation=4),
            nn.ReLU(inplace=True),
        )
        self.context = nn.Linear(dim, dim)  # global context added to every cell (object size, presence)
        self.objectness = nn.Conv2d(dim, 1, 1)
        self.distances = nn.Conv2d(dim, 4, 1)
        self.presence = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor):
        f = self.body(x)
        pooled = f.mean(dim=(2, 3))
        f = F.relu(f + self.context(pooled)[:, :, None, None])
        b, _, h, w = f.shape
        score = self.objectness(f)  # (B, 1, h, w)
        dist = F.softplus(self.distances(f)) * 0.25  # fractions of the side; softplus keeps x0 <= x1
        ys = (torch.arange(h, device=x.device, dtype=f.dtype) + 0.5) / h
        xs = (torch.arange(w, device=x.device, dtype=f.dtype) + 0.5) / w
        cx, cy = xs.view(1, 1, w).expand(b, h, w), ys.view(1, h, 1).expand(b, h, w)
        boxes = torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], dim=1)
        weights = torch.softmax(score.flatten(1), dim=1)  # (B, h*w)
        box = (boxes.flatten(2) * weights[:, None]).sum(-1).clamp(0, 1)  # (B, 4) in [0, 1]
        return box, score, self.presence(pooled)[:, 0]


class APM(nn.Module):
    """Encoder taps (each (B, C_i, 64, 64), C_i from ``tap_channels``) -> ``ApmOutput`` in the input frame
    of a backbone whose square input is ``image_size``."""

    labels: torch.Tensor  # a buffer (typed here: nn.Module's attribute lookup types it as Tensor | Module)

    def __init__(
        self,
        tap_channels: Sequence[int],
        image_size: int,
        prompts: Sequence[str] = ("points",),
        slot_labels: Sequence[int] = tuple(default_slot_labels(16, 8)),
        fusion_dim: int = 256,
        head_blocks: Sequence[int] = RESNET34_BLOCKS,
        tap_pool: int = 1,
        box_refinement: int = 0,
        refinement_margin: float = 0.0,
    ):
        super().__init__()
        check_config(tap_channels, image_size, prompts, slot_labels, fusion_dim, head_blocks, tap_pool)
        prompts = tuple(prompts)
        self.config = ApmConfig(
            tuple(int(c) for c in tap_channels),
            int(image_size),
            prompts,
            tuple(int(v) for v in slot_labels),
            int(fusion_dim),
            tuple(int(b) for b in head_blocks),
            int(tap_pool),
        )
        self.image_size, self.prompts, self.tap_pool = int(image_size), prompts, int(tap_pool)
        self.register_buffer("labels", torch.tensor(list(slot_labels), dtype=torch.int32), persistent=False)
        # Taps differ in scale (TinyViT: std 0.3-0.45; ViT blocks far more): normalise each before fusing.
        self.norms = nn.ModuleList([nn.GroupNorm(1, c) for c in tap_channels])
        self.fusion = nn.Sequential(
            nn.Conv2d(sum(tap_channels), fusion_dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(fusion_dim, fusion_dim, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(fusion_dim, fusion_dim, 3, padding=1),
        )
        self.point_head = PointHead(fusion_dim, len(slot_labels), head_blocks) if "points" in prompts else None
        self.box_head = BoxHead(fusion_dim) if "box" in prompts else None
        self.set_refinement(box_refinement, refinement_margin)
        self.to(memory_format=torch.channels_last)  # NHWC convs: faster on CPUs (oneDNN)

    def set_refinement(self, steps: int, margin: float) -> None:
        """How inference refines the box (``promise.ProMISeModel``): ``steps`` re-decodes, each with the
        previous mask's bounding box grown by ``margin`` of its size on every side. Chosen on held-out
        images after training (``training.choose_box_refinement``) and kept in the adapter's metadata."""
        if not _is_int(steps) or isinstance(margin, bool) or not isinstance(margin, (int, float)):
            raise ValueError(
                f"box refinement must be a whole number of steps and a margin, got {steps!r} and {margin!r}"
            )
        steps, margin = int(steps), float(margin)
        if not 0 <= steps <= MAX_REFINEMENT or not 0.0 <= margin <= 1.0:
            raise ValueError(
                f"box refinement must be 0..{MAX_REFINEMENT} steps with a margin in [0, 1], got {steps} and {margin}"
            )
        if steps and self.box_head is None:
            raise ValueError("box refinement needs an APM with a box head")
        self.box_refinement, self.refinement_margin = steps, margin
        self.config = replace(self.config, box_refinement=steps, refinement_margin=margin)

    @staticmethod
    def from_config(config: ApmConfig) -> "APM":
        return APM(**asdict(config))

    @property
    def n_points(self) -> int:
        return int(self.labels.numel()) if self.point_head is not None else 0

    def prepare_taps(self, taps: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Parameter-free input step (average pooling by ``tap_pool``); training caches its result."""
        if self.tap_pool == 1:
            return list(taps)
        return [F.avg_pool2d(t.float(), self.tap_pool) for t in taps]

    def forward(self, taps: Sequence[torch.Tensor], prepared: bool = False) -> ApmOutput:
        taps = list(taps) if prepared else self.prepare_taps(taps)
        x = torch.cat([norm(t.float()) for norm, t in zip(self.norms, taps)], dim=1)
        x = F.relu(self.fusion(x.contiguous(memory_format=torch.channels_last)))
        out = ApmOutput()
        if self.point_head is not None:
            out.points = self.point_head(x) * self.image_size
            out.labels = self.labels[None].expand(x.shape[0], -1)
        if self.box_head is not None:
            box, out.objectness, out.presence = self.box_head(x)
            corners = box.view(-1, 2, 2) * self.image_size
            out.box = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values], dim=1)
        return out
