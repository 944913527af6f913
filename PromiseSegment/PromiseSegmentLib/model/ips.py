"""Incremental Pattern Shifting: an image-conditioned additive shift of SAM's mask tokens."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from PromiseSegmentLib.model.module_configs import IpsConfig

# Every registered backbone's mask decoder (SAM's) has 256-wide embeddings and 4 mask tokens; an IPS of other
# sizes cannot shift them. The hidden width is bounded so an edited adapter file cannot ask for gigabytes.
DECODER_DIM, MASK_TOKENS, MAX_HIDDEN = 256, 4, 8192


def check_config(dim, hidden, n_tokens) -> None:
    """Refuse sizes that cannot fit the decoder or are absurd, before any layer is allocated."""

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if not (is_int(dim) and dim == DECODER_DIM and is_int(n_tokens) and n_tokens == MASK_TOKENS):
        raise ValueError(
            f"IPS dim and n_tokens must be {DECODER_DIM} and {MASK_TOKENS} (the mask decoder's), got "
            f"{dim!r} and {n_tokens!r}"
        )
    if not (is_int(hidden) and 1 <= hidden <= MAX_HIDDEN):
        raise ValueError(f"IPS hidden must be an integer in 1..{MAX_HIDDEN}, got {hidden!r}")


class IPS(nn.Module):
    """Incremental Pattern Shifting: GAP(image embedding) -> MLP -> additive shift of the mask tokens.

    The last layer starts at zero, so an untrained IPS leaves SAM's decoder exactly as it is.
    """

    def __init__(self, dim: int = DECODER_DIM, hidden: int = 1024, n_tokens: int = MASK_TOKENS):
        super().__init__()
        check_config(dim, hidden, n_tokens)
        self.config = IpsConfig(dim, hidden, n_tokens)
        self.n_tokens, self.dim = n_tokens, dim
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, n_tokens * dim))
        last = cast(nn.Linear, self.mlp[2])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @staticmethod
    def from_config(config: IpsConfig) -> "IPS":
        return IPS(config.dim, config.hidden, config.n_tokens)

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        pattern = image_embedding.float().mean(dim=(2, 3))
        return self.mlp(pattern).view(-1, self.n_tokens, self.dim)
