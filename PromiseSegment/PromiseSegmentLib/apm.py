"""Auto-Prompting Module: SAM encoder features (three blocks) -> N point prompts in the 1024 frame.

No supervision on the points: gradients reach the APM only through SAM's frozen prompt encoder
and mask decoder, from the mask loss.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

RESNET34_BLOCKS = (3, 4, 6, 3)


def default_slot_labels(n_points: int, n_positive: int) -> List[int]:
    return [1] * n_positive + [0] * (n_points - n_positive)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class APM(nn.Module):
    def __init__(self, in_channels: int, slot_labels: Sequence[int] = tuple(default_slot_labels(16, 8)),
                 fusion_dim: int = 256, head_blocks: Sequence[int] = RESNET34_BLOCKS, image_size: int = 1024):
        super().__init__()
        self.config = {"in_channels": in_channels, "slot_labels": [int(v) for v in slot_labels],
                       "fusion_dim": fusion_dim, "head_blocks": [int(b) for b in head_blocks],
                       "image_size": image_size}
        self.image_size = image_size
        self.register_buffer("labels", torch.tensor(list(slot_labels), dtype=torch.int32), persistent=False)
        self.fusion = nn.Sequential(
            nn.Conv2d(3 * in_channels, fusion_dim, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(fusion_dim, fusion_dim, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(fusion_dim, fusion_dim, 3, padding=1))
        layers: List[nn.Module] = [nn.Conv2d(fusion_dim, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64),
                                   nn.ReLU(inplace=True)]
        cin = 64
        for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), head_blocks)):
            for b in range(blocks):
                layers.append(BasicBlock(cin, width, 2 if (b == 0 and stage > 0) else 1))
                cin = width
        self.trunk = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.points = nn.Linear(cin, 2 * len(slot_labels))

    @property
    def n_points(self) -> int:
        return int(self.labels.numel())

    def forward(self, block_features: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Block outputs (B, C, 64, 64) x3 -> points (B, N, 2) as (x, y) in the input frame, labels (B, N)."""
        x = self.fusion(torch.cat(list(block_features), dim=1).float())
        pts = torch.sigmoid(self.points(self.trunk(x))) * self.image_size
        b = pts.shape[0]
        return pts.view(b, -1, 2), self.labels[None].expand(b, -1)
