"""SAM's mask-decoder forward, re-expressed with SAM's own submodules plus one extension point:
a per-image additive shift of the 4 mask tokens (ProMISe's IPS). SAM's modules are not edited.

With ``mask_token_shift=None`` (or all zeros) the result equals ``MaskDecoder.forward`` exactly;
``Testing/backbones/test_oracle.py`` checks this against segment-anything itself.
"""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import torch
from segment_anything.modeling import Sam

from PromiseSegmentLib.backbones.decoder_rewrites import upscaled_masks


def decode_masks(
    sam: Sam,
    image_embeddings: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
    multimask_output: bool,
    mask_token_shift: Optional[torch.Tensor] = None,
    token: Optional[int] = None,
    decoder=None,
    image_pe: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Low-res mask logits (B, C, 256, 256) and IoU predictions (B, C).

    ``image_embeddings`` is (1 or B, 256, 64, 64): one image shared by B prompt sets (SAM's
    predictor) or one image per prompt set (batched training). ``mask_token_shift`` is
    (1 or B, num_mask_tokens, 256). ``token`` (0..3) returns that mask token's output alone (ProMISe's
    decode token, set by the backbone); otherwise ``multimask_output`` chooses as SAM does. ``decoder`` and
    ``image_pe`` replace ``sam``'s own (``HalfDecoder``'s reduced-precision copies).
    """
    dec = sam.mask_decoder if decoder is None else decoder
    b = sparse_prompt_embeddings.shape[0]
    tokens = torch.cat((_output_tokens(dec, b, mask_token_shift), sparse_prompt_embeddings), dim=1)
    src = _per_prompt_set(image_embeddings, b) + dense_prompt_embeddings
    image_pe = sam.prompt_encoder.get_dense_pe() if image_pe is None else image_pe
    pos_src = image_pe if b == 1 else torch.repeat_interleave(image_pe, b, dim=0)  # one image: no 4 MB copy
    _, c, h, w = src.shape

    hs, src = dec.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : (1 + dec.num_mask_tokens), :]

    src = src.transpose(1, 2).view(b, c, h, w)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(dec.output_hypernetworks_mlps)], dim=1
    )
    masks = upscaled_masks(dec.output_upscaling, src, hyper_in)
    iou_pred = dec.iou_prediction_head(iou_token_out)

    if token is not None:
        sel = slice(token, token + 1)
    else:
        sel = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, sel], iou_pred[:, sel]


def _output_tokens(dec, b: int, mask_token_shift: Optional[torch.Tensor]) -> torch.Tensor:
    """SAM's IoU and mask tokens for ``b`` prompt sets, the mask tokens shifted by IPS when given."""
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    if mask_token_shift is None:
        return output_tokens
    shift = mask_token_shift.to(output_tokens.dtype).expand(b, -1, -1)
    return torch.cat([output_tokens[:, :1], output_tokens[:, 1:] + shift], dim=1)


def _per_prompt_set(image_embeddings: torch.Tensor, b: int) -> torch.Tensor:
    if image_embeddings.shape[0] == b:
        return image_embeddings
    if image_embeddings.shape[0] == 1:
        return torch.repeat_interleave(image_embeddings, b, dim=0)
    raise ValueError(f"{image_embeddings.shape[0]} image embeddings for {b} prompt sets")


NHWC = torch.channels_last


class HalfDecoder:
    """A frozen copy of SAM's mask decoder and dense positional encoding in bf16/fp16, run without autocast.
    Under autocast every linear re-casts its fp32 weights and the fp32 residual stream on each call; with
    the weights and activations already in the half type that work is gone (docs/benchmarks.md has the
    timings; masks agree with fp32 as closely as under autocast). The image embedding, dense prompt and
    positional encoding go in as NHWC, so that the transformer's adds, norms and projections over the 4096
    image tokens read contiguous memory."""

    def __init__(self, sam: Sam, dtype: torch.dtype):
        self.dtype = dtype
        self.decoder = copy.deepcopy(sam.mask_decoder).to(dtype).eval().requires_grad_(False)
        with torch.no_grad():  # NHWC: the transformer's (B, HW, C) view of the image is then contiguous
            self.image_pe = sam.prompt_encoder.get_dense_pe().detach().to(dtype, memory_format=NHWC)

    def __call__(
        self,
        sam: Sam,
        image_embeddings,
        sparse,
        dense,
        multimask_output: bool,
        mask_token_shift=None,
        token: Optional[int] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        dt = self.dtype
        with torch.autocast(image_embeddings.device.type, enabled=False):
            low_res, iou = decode_masks(
                sam,
                image_embeddings.to(dt, memory_format=NHWC),
                sparse.to(dt),
                dense.to(dt, memory_format=NHWC),
                multimask_output,
                None if mask_token_shift is None else mask_token_shift.to(dt),
                token,
                decoder=self.decoder,
                image_pe=self.image_pe,
            )
        return low_res.float(), iou.float()
