"""SAM ViT backbones (official SAM ViT-B/L/H, MedSAM) and the seeded tiny ViT used as a test fixture.

Models are built with segment-anything's own classes; weights are loaded by ``Backbone.load`` so that
no code path ever unpickles a file.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from segment_anything.modeling.image_encoder import Attention as VitAttention
from segment_anything.modeling.image_encoder import get_rel_pos

from PromiseSegmentLib.backbones.base import Backbone, LoadedBackbone, freeze
from PromiseSegmentLib.backbones.checkpoints import CheckpointInfo

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
    def tap_blocks(self) -> Tuple[int, int, int]:
        """0-based encoder blocks whose outputs feed the APM.

        Rule: the blocks ending the 2nd, 3rd and 4th quarter of the encoder (ViT-B: 6, 9, 12 in
        1-based numbering; ViT-L: 12, 18, 24; ViT-H: 16, 24, 32).
        """
        return tuple(self.depth * k // 4 - 1 for k in (2, 3, 4))  # type: ignore[return-value]


ARCHITECTURES: Dict[str, SamArchitecture] = {
    "vit_b": SamArchitecture("vit_b", 768, 12, 12, (2, 5, 8, 11)),
    "vit_l": SamArchitecture("vit_l", 1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": SamArchitecture("vit_h", 1280, 32, 16, (7, 15, 23, 31)),
    # Test fixture only: SAM's exact module layout with a narrow, shallow encoder and seeded random
    # weights. It is NOT SAM and never a user default; it runs every ViT code path fast on a CPU.
    "tiny": SamArchitecture("tiny", 64, 4, 4, ()),  # windowed attention only
}
TINY_SEED = 20240607
TINY_DECODER_GAIN = 16.0  # random decoder heads give logits of +-0.1; scaled so adapters can learn through them


def build_sam(variant: str) -> Sam:
    """Build an (untrained) SAM of the given variant with segment-anything's classes (train mode)."""
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
    return sam


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


BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"


class SamViT(Backbone):
    """Official SAM ViT-B/L/H (and MedSAM, ViT-B layout): 1024 input, ImageNet normalisation, point
    prompts; ProMISe decodes the first multimask output (token 1) as in the paper."""

    family = "sam_vit"
    image_size = 1024
    mask_token = 1
    apm_prompts = ("points",)

    def __init__(self, name: str, variant: str, description: str, checkpoint: Optional[CheckpointInfo]):
        self.name, self.variant, self.description, self._checkpoint = name, variant, description, checkpoint
        arch = ARCHITECTURES[variant]
        self.tap_blocks = arch.tap_blocks
        self.tap_channels = (arch.embed_dim,) * len(self.tap_blocks)

    @property
    def checkpoint(self) -> Optional[CheckpointInfo]:
        return self._checkpoint

    def build(self) -> Sam:
        return build_sam(self.variant)

    def recognises(self, state: Mapping[str, torch.Tensor]) -> bool:
        pos = state.get("image_encoder.pos_embed")
        if pos is None or pos.ndim != 4:
            return False
        depth = len({k.split(".")[2] for k in state if k.startswith("image_encoder.blocks.")})
        arch = ARCHITECTURES[self.variant]
        return pos.shape[-1] == arch.embed_dim and depth == arch.depth

    def encode(self, sam: Sam, x: torch.Tensor, taps: bool):
        # ImageEncoderViT.forward, step by step, keeping the APM's blocks (BHWC -> BCHW).
        enc = sam.image_encoder
        x = enc.patch_embed(x)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        kept: List[torch.Tensor] = []
        for i, blk in enumerate(enc.blocks):
            x = blk(x)
            if taps and i in self.tap_blocks:
                kept.append(x.permute(0, 3, 1, 2))
        return enc.neck(x.permute(0, 3, 1, 2)), kept

    def optimise(self, sam: Sam) -> List[str]:
        return [f"{sdpa_encoder_attention(sam.image_encoder)} encoder attention layers on SDPA"] + super().optimise(sam)


def _sdpa_vit_attention(self, x: torch.Tensor) -> torch.Tensor:
    """segment_anything's ViT ``Attention.forward`` with one fused attention kernel: the decomposed relative
    position terms (from the unscaled queries, as ``add_decomposed_rel_pos``) become the additive mask."""
    b, h, w, _ = x.shape
    q, k, v = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = None
    if self.use_rel_pos:
        r_q = q.reshape(b * self.num_heads, h, w, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, self.num_heads, h * w, h * w).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
    return self.proj(out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))


_SDPA_VIT = type("SdpaVitAttention", (VitAttention,), {"forward": _sdpa_vit_attention})


def sdpa_encoder_attention(encoder: torch.nn.Module) -> int:
    """Route every attention block of a SAM ViT encoder through ``_sdpa_vit_attention`` (same weights;
    fp32 outputs equal up to rounding). Returns how many blocks."""
    blocks = [m for m in encoder.modules() if type(m) is VitAttention]
    for m in blocks:
        m.__class__ = _SDPA_VIT
    return len(blocks)


class TinyRandomViT(SamViT):
    """Test fixture: the tiny ViT with seeded random weights (no file) - NOT SAM, never offered to users."""

    user_visible = False

    def __init__(self):
        super().__init__("tiny_random", "tiny", "test fixture: tiny SAM-layout ViT with seeded random weights", None)

    def load(self, path: Optional[Path] = None, progress=None, cancel=None, optimise: bool = True) -> LoadedBackbone:
        if path is not None:
            return super().load(path, optimise=optimise)
        sam = build_seeded_sam("tiny", TINY_SEED)
        with torch.no_grad():
            for mlp in sam.mask_decoder.output_hypernetworks_mlps:
                mlp.layers[-1].weight.mul_(TINY_DECODER_GAIN)
                mlp.layers[-1].bias.mul_(TINY_DECODER_GAIN)
        return LoadedBackbone(self, freeze(sam.eval()), f"seed:{TINY_SEED}/gain:{TINY_DECODER_GAIN:g}")


SAM_VIT_BACKBONES = [
    SamViT(
        "sam_vit_b",
        "vit_b",
        "SAM ViT-B (375 MB download), the ProMISe paper's backbone",
        CheckpointInfo(
            "sam_vit_b_01ec64.pth",
            BASE_URL + "sam_vit_b_01ec64.pth",
            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
            None,
        ),
    ),
    SamViT(
        "sam_vit_l",
        "vit_l",
        "SAM ViT-L (1.2 GB download)",
        CheckpointInfo(
            "sam_vit_l_0b3195.pth",
            BASE_URL + "sam_vit_l_0b3195.pth",
            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
            None,
        ),
    ),
    SamViT(
        "sam_vit_h",
        "vit_h",
        "SAM ViT-H (2.5 GB download)",
        CheckpointInfo(
            "sam_vit_h_4b8939.pth",
            BASE_URL + "sam_vit_h_4b8939.pth",
            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
            None,
        ),
    ),
    SamViT(
        "medsam",
        "vit_b",
        "MedSAM (ViT-B layout; user-supplied: put medsam_vit_b.pth in the cache or pass its path)",
        CheckpointInfo("medsam_vit_b.pth", None, None, None),
    ),
    TinyRandomViT(),
]
