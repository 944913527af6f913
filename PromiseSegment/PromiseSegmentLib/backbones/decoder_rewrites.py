"""Load-time rewrites of SAM's prompt encoder and mask decoder that keep their fp32 outputs (up to rounding).

The decoder's cross-attention runs between a handful of prompt tokens and the 4096 image tokens. Where one
side has so few tokens that, per head, they form a matrix no wider than the projection they meet, the
projection of the 4096 image tokens is folded into the tokens' side instead (``_few_queries``,
``_few_keys``): two matrix products over the image tokens replace a projection, an attention kernel and a
layout copy. The upscaling's 2x2 stride-2 transposed convolutions do not overlap, so each is one matrix
product over pixel rows (``_upscaling_as_matmuls``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from PromiseSegmentLib.backbones.rewrites import swap_method

if TYPE_CHECKING:
    from segment_anything.modeling import Sam


def _sdpa_attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's decoder ``Attention.forward`` through ``scaled_dot_product_attention``."""
    q, k, v = (
        self._separate_heads(p(t), self.num_heads) for p, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v))
    )
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def _heads(self, x: torch.Tensor) -> torch.Tensor:
    """(B, N, internal) -> (B, heads, N, head width), as ``Attention._separate_heads``."""
    b, n, c = x.shape
    return x.view(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)


def _fold(x: torch.Tensor, linear: nn.Linear, input_side: bool = False) -> torch.Tensor:
    """(B, heads, n, head width) tokens times each head's rows (``input_side``: columns) of a projection's
    weight -> (B, heads * n, embedding); in fp32 (a few thousand products), so bf16 rounds once."""
    w = linear.weight.t() if input_side else linear.weight
    b, h, n, _ = x.shape
    folded = torch.einsum("bhnd,hdc->bhnc", x.float(), w.float().reshape(h, -1, w.shape[-1]))
    return folded.reshape(b, h * n, -1)


def _few_queries(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Tokens attending to the image: the key and value projections of the N image tokens are folded into
    the few queries, so the image tokens meet two (heads x queries, embedding) matrices instead."""
    b, n, _ = q.shape
    h = self.num_heads
    qh = _heads(self, self.q_proj(q))  # (B, h, n, d)
    d = qh.shape[-1]
    folded = (_fold(qh, self.k_proj) / math.sqrt(d)).to(q.dtype)  # q . key bias: the same for every key
    # the N image tokens stay the left, contiguous operand (a transposed one is copied); softmax over dim 1
    scores = k @ folded.transpose(1, 2)  # (B, N, h n); the softmax drops the bias
    attn = torch.softmax(scores, dim=1, dtype=torch.float32).to(q.dtype)
    mixed = (attn.transpose(1, 2) @ v).view(b, h, n, -1)  # each head's weighted mean of the raw image tokens
    weight = self.v_proj.weight.reshape(h, d, -1)
    out = torch.einsum("bhnc,hdc->bhnd", mixed, weight) + self.v_proj.bias.view(h, 1, d)
    return self.out_proj(out.transpose(1, 2).reshape(b, n, h * d))


def _few_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The image attending to tokens: the query and output projections of the N image tokens are folded
    into the few keys and values."""
    b, n, _ = k.shape
    h = self.num_heads
    kh, vh = _heads(self, self.k_proj(k)), _heads(self, self.v_proj(v))  # (B, h, n, d)
    scale = 1.0 / math.sqrt(kh.shape[-1])
    keys = (_fold(kh, self.q_proj) * scale).to(q.dtype)
    key_bias = (torch.einsum("bhnd,hd->bhn", kh.float(), self.q_proj.bias.float().view(h, -1)) * scale).to(q.dtype)
    key_bias = key_bias.reshape(b, 1, h * n)
    scores = torch.baddbmm(key_bias, q, keys.transpose(1, 2)).view(b, -1, h, n)
    # a softmax over 7-wide innermost rows runs element by element: over a middle dimension it vectorises
    attn = torch.softmax(scores.permute(0, 2, 3, 1), dim=2, dtype=torch.float32).permute(0, 3, 1, 2)
    attn = attn.to(q.dtype).reshape(b, -1, h * n)
    values = _fold(vh, self.out_proj, input_side=True).to(q.dtype)
    return torch.baddbmm(self.out_proj.bias.view(1, 1, -1), attn, values)


def _attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's decoder ``Attention.forward``: folded where one side is small enough, else SDPA."""
    nq, nk = q.shape[1], k.shape[1]
    if nq < nk and self.num_heads * nq <= self.internal_dim:
        return _few_queries(self, q, k, v)
    if nk < nq and self.num_heads * nk <= self.internal_dim:
        return _few_keys(self, q, k, v)
    return _sdpa_attention_forward(self, q, k, v)


def _cached_dense_pe(self) -> torch.Tensor:
    return self._dense_pe_cache


def _is_patch_deconv(m: nn.Module) -> bool:
    """A ConvTranspose2d whose 2x2 kernels do not overlap (stride 2, no padding): one matrix product per pixel."""
    return (
        type(m) is nn.ConvTranspose2d
        and m.kernel_size == (2, 2)
        and m.stride == (2, 2)
        and m.padding == (0, 0)
        and m.output_padding == (0, 0)
        and m.dilation == (1, 1)
        and m.groups == 1
        and m.bias is not None
    )


def _upscaling_fits(seq: nn.Module) -> bool:
    """SAM's ``output_upscaling``: deconv, LayerNorm2d, GELU, deconv, GELU (``MaskDecoder.__init__``)."""
    mods = list(seq.children())
    return (
        type(seq) is nn.Sequential
        and len(mods) == 5
        and _is_patch_deconv(mods[0])
        and type(mods[1]).__name__ == "LayerNorm2d"
        and _is_patch_deconv(mods[3])
        and all(type(m) is nn.GELU and m.approximate == "none" for m in (mods[2], mods[4]))
    )


def _patch_deconv_rows(rows: torch.Tensor, deconv: nn.ConvTranspose2d) -> torch.Tensor:
    """(N, C_in) pixels -> (N * 4, C_out) pixels: each input pixel's 2x2 output patch, ordered (dy, dx)."""
    w = deconv.weight  # (C_in, C_out, 2, 2)
    weight = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)  # (C_in, dy * dx * C_out)
    assert deconv.bias is not None  # _is_patch_deconv
    out = torch.addmm(deconv.bias.repeat(4), rows, weight)
    return out.view(-1, w.shape[1])


def _upscaled_rows(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's decoder upscaling (4x) on pixel rows: each 2x2 stride-2 deconv is one matrix product (the
    kernels do not overlap) and LayerNorm2d a layer norm over each pixel's channels. Rows are ordered
    (b, i, j, dy1, dx1, dy2, dx2): output pixel (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2)."""
    up1, norm, _, up2, _ = self.children()
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # free when x is NHWC in memory (the decoder's src)
    y = _patch_deconv_rows(rows, cast(nn.ConvTranspose2d, up1))
    weight, bias, eps = cast(torch.Tensor, norm.weight), cast(torch.Tensor, norm.bias), cast(float, norm.eps)
    y = F.gelu(F.layer_norm(y, y.shape[-1:], weight, bias, eps))
    return F.gelu(_patch_deconv_rows(y, cast(nn.ConvTranspose2d, up2)))


def _in_place(rows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """``_upscaled_rows``-ordered rows (b * h * w * 16, C) -> (b, C, 4h, 4w) pixels (NHWC in memory)."""
    y = rows.view(b, h, w, 2, 2, 2, 2, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return y.reshape(b, 4 * h, 4 * w, -1).permute(0, 3, 1, 2)


def _upscaling_as_matmuls(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``output_upscaling``'s forward through ``_upscaled_rows``. On a CPU the bf16 ConvTranspose2d with
    NCHW input took 5 ms of a 17 ms prompt (docs/benchmarks.md)."""
    b, _, h, w = x.shape
    return _in_place(_upscaled_rows(self, x), b, h, w)


def upscaled_masks(upscaling: nn.Module, src: torch.Tensor, hyper_in: torch.Tensor) -> torch.Tensor:
    """The decoder's mask logits ``hyper_in @ upscaling(src)``, (B, T, H, W). With the rewritten upscaling
    the T products are taken on the pixel rows and only the T-channel result is put in place."""
    b, _, h, w = src.shape
    if type(upscaling).forward is not _upscaling_as_matmuls:
        up = upscaling(src)
        return (hyper_in @ up.reshape(b, up.shape[1], -1)).view(b, -1, *up.shape[2:])
    rows = _upscaled_rows(cast(nn.Sequential, upscaling), src)
    masks = rows.view(b, -1, rows.shape[-1]) @ hyper_in.transpose(1, 2)  # (B, 16 h w, T)
    return _in_place(masks, b, h, w)


def optimise_sam_decoder(sam: Sam) -> list:
    """Rewrites for SAM's prompt encoder and mask decoder (exact up to float rounding): the dense positional
    encoding of the 64x64 grid computed once (a non-persistent buffer; it only depends on frozen weights)
    instead of at every decode, the decoder's attention folded into its projections or through
    ``scaled_dot_product_attention`` (``_attention_forward``), and its upscaling as matrix products
    (``_upscaling_as_matmuls``)."""
    from segment_anything.modeling.transformer import Attention

    pe = sam.prompt_encoder
    with torch.no_grad():
        pe.register_buffer("_dense_pe_cache", pe.get_dense_pe().detach().clone(), persistent=False)
    swap_method(pe, "get_dense_pe", _cached_dense_pe)
    layers = [m for m in sam.mask_decoder.modules() if type(m) is Attention]
    for m in layers:
        swap_method(m, "forward", _attention_forward)
    done = ["dense positional encoding cached", f"{len(layers)} decoder attention layers folded or on SDPA"]
    upscaling = sam.mask_decoder.output_upscaling
    if _upscaling_fits(upscaling):
        swap_method(upscaling, "forward", _upscaling_as_matmuls)
        done.append("decoder upscaling as matrix products")
    return done
