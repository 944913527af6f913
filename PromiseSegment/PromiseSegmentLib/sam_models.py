"""SAM architectures: the official variants plus the small seeded default backbone.

Models are always built with segment-anything's own classes; weights are loaded separately
(see ``checkpoints``) so that no code path ever unpickles a file.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Dict, Mapping, Tuple

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

IMAGE_SIZE = 1024
PATCH_SIZE = 16
PROMPT_DIM = 256


@dataclass(frozen=True)
class SamArchitecture:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]

    @property
    def apm_blocks(self) -> Tuple[int, int, int]:
        """0-based encoder blocks whose outputs feed the APM.

        Rule: the blocks ending the 2nd, 3rd and 4th quarter of the encoder (ViT-B: 6, 9, 12 in
        1-based numbering; ViT-L: 12, 18, 24; ViT-H: 16, 24, 32).
        """
        return tuple(self.depth * k // 4 - 1 for k in (2, 3, 4))  # type: ignore[return-value]


ARCHITECTURES: Dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # The embedded default: SAM's exact module layout, much narrower/shallower encoder.
    # It is NOT SAM - random weights from a fixed seed - but it runs the same code paths.
    "tiny": SamArchitecture("tiny", 64, 4, 4, ()),  # windowed attention only: fast on a CPU
}

DEFAULT_BACKBONE_SEED = 20240607
DEFAULT_DECODER_GAIN = 16.0
DEFAULT_BACKBONE_IDENTITY = f"seed:{DEFAULT_BACKBONE_SEED}/gain:{DEFAULT_DECODER_GAIN:g}"


def build_sam(variant: str) -> Sam:
    """Build an (untrained) SAM of the given variant in eval mode, using segment-anything's classes."""
    if variant not in ARCHITECTURES:
        raise ValueError(f"Unknown SAM variant {variant!r}; expected one of {sorted(ARCHITECTURES)}")
    arch = ARCHITECTURES[variant]
    grid = IMAGE_SIZE // PATCH_SIZE
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=arch.depth,
            embed_dim=arch.embed_dim,
            img_size=IMAGE_SIZE,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=arch.num_heads,
            patch_size=PATCH_SIZE,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=list(arch.global_attn_indexes),
            window_size=14,
            out_chans=PROMPT_DIM,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def build_seeded_sam(variant: str, seed: int) -> Sam:
    """A randomly initialised SAM that is identical for the same (variant, seed) on any machine."""
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        sam = build_sam(variant)
        # SAM zero-initialises relative positions and the pos-embed; give them small seeded values so
        # the random encoder is not degenerate (spatially uniform positional terms).
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in sam.image_encoder.named_parameters():
                if name == "pos_embed" or name.endswith("rel_pos_h") or name.endswith("rel_pos_w"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    finally:
        torch.random.set_rng_state(state)
    return sam.eval()


def build_default_backbone(seed: int = DEFAULT_BACKBONE_SEED) -> Sam:
    """The embedded default backbone (no weight file): tiny SAM architecture from a fixed seed.

    One calibration on top of the seeded init: the hypernetwork heads' last layer is scaled by
    ``DEFAULT_DECODER_GAIN``. Randomly initialised heads give mask logits of about +-0.1 (a trained
    SAM's span +-10 and more), so every pixel sits at the 0.5 threshold and an adapter's gradient
    through the frozen decoder is tiny; measured on Kvasir (``Testing/benchmarks/ablation.py``),
    APM+IPS did not learn at gain 1 and does at this gain. It is a fixed constant of the backbone,
    part of its identity.
    """
    sam = build_seeded_sam("tiny", seed)
    with torch.no_grad():
        for mlp in sam.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.mul_(DEFAULT_DECODER_GAIN)
            mlp.layers[-1].bias.mul_(DEFAULT_DECODER_GAIN)
    return sam


def detect_variant(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Identify the SAM variant a state dict belongs to from its tensor shapes."""
    pos = state_dict.get("image_encoder.pos_embed")
    if pos is None or pos.ndim != 4:
        raise ValueError("not a SAM state dict (no 'image_encoder.pos_embed' of shape 1x64x64xC)")
    depth = len({k.split(".")[2] for k in state_dict if k.startswith("image_encoder.blocks.")})
    for name, arch in ARCHITECTURES.items():
        if arch.embed_dim == pos.shape[-1] and arch.depth == depth:
            return name
    raise ValueError(f"SAM-like state dict with embed_dim={pos.shape[-1]}, depth={depth} matches no known variant")

