"""Incremental Pattern Shifting: an image-conditioned additive shift of SAM's mask tokens."""
from __future__ import annotations

import torch
from torch import nn


class IPS(nn.Module):
    """Incremental Pattern Shifting: GAP(image embedding) -> MLP -> additive shift of the mask tokens.

    The last layer starts at zero, so an untrained IPS leaves SAM's decoder exactly as it is.
    """

    def __init__(self, dim: int = 256, hidden: int = 1024, n_tokens: int = 4):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "n_tokens": n_tokens}
        self.n_tokens, self.dim = n_tokens, dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        pattern = image_embedding.float().mean(dim=(2, 3))
        return self.mlp(pattern).view(-1, self.n_tokens, self.dim)
