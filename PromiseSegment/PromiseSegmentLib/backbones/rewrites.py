"""Load-time rewrites of frozen modules that keep their fp32 outputs (up to rounding): BatchNorm folded into
the convolution before it, conv/linear + GELU fused where oneDNN has the kernel, attention through
``scaled_dot_product_attention``, the decoder's constant positional encoding cached, and its upscaling's
transposed convolutions as matrix products."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

_Pair = Tuple[int, int]  # a Conv2d's sizes (``_ConvNd`` types them as ``tuple[int, ...]``)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv computing ``bn(conv(x))`` with the BatchNorm's running statistics (inference only)."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None, "folding needs the running statistics (_foldable)"
    gamma = bn.weight if bn.affine else torch.ones_like(var)
    beta = bn.bias if bn.affine else torch.zeros_like(mean)
    scale = gamma / torch.sqrt(var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        cast(_Pair, conv.kernel_size),
        cast(_Pair, conv.stride),
        cast(Union[str, _Pair], conv.padding),
        cast(_Pair, conv.dilation),
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    )
    assert fused.bias is not None  # bias=True
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        fused.bias.copy_((bias - mean) * scale + beta)
    fused.requires_grad_(conv.weight.requires_grad)
    return fused.to(conv.weight.device).eval()


def fold_batchnorm(root: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential`` into that conv
    (a Sequential of exactly the two becomes the conv). BatchNorms in training mode are left alone.
    Returns how many were folded."""
    count = 0
    for name, child in list(root.named_children()):
        if isinstance(child, nn.Sequential):
            mods = list(child)
            if len(mods) == 2 and _foldable(*mods):
                setattr(root, name, _fold_pair(*mods))
                count += 1
                continue
            for i in range(len(mods) - 1):
                if _foldable(mods[i], mods[i + 1]):
                    child[i], child[i + 1] = _fold_pair(mods[i], mods[i + 1]), nn.Identity()
                    count += 1
        count += fold_batchnorm(child)
    return count


def _foldable(a: nn.Module, b: nn.Module) -> bool:
    return (
        type(a) is nn.Conv2d
        and type(b) is nn.BatchNorm2d
        and not b.training
        and b.track_running_stats
        and b.running_var is not None
        and b.num_features == a.out_channels
    )


def _fold_pair(a: nn.Module, b: nn.Module) -> nn.Conv2d:
    """``fold_conv_bn`` of a pair that ``_foldable`` accepted (so a Conv2d and a BatchNorm2d)."""
    return fold_conv_bn(cast(nn.Conv2d, a), cast(nn.BatchNorm2d, b))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give a conv/linear on ``x`` (our fused CPU ops bypass autocast)."""
    if torch.is_autocast_enabled("cpu") and x.is_floating_point():
        return torch.get_autocast_dtype("cpu")
    return x.dtype


@functools.lru_cache(maxsize=1)
def mkldnn_fusion_available() -> bool:
    """Whether oneDNN's fused conv+GELU / linear+GELU CPU kernels exist and match the unfused ops."""
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # the first call may come under autocast
            return _mkldnn_fusion_matches()
    except (AttributeError, RuntimeError):
        return False


def _mkldnn_fusion_matches() -> bool:
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*shape, generator=gen) for shape in ((1, 4, 5, 5), (6, 4, 1, 1), (6,)))
    y = torch.ops.mkldnn._convolution_pointwise(x, w, b, [0, 0], [1, 1], [1, 1], 1, "gelu", [None], "none")
    rows, lw = x.flatten(2).transpose(1, 2)[0], w.flatten(1)  # (25, 4) tokens, (6, 4) weight
    z = torch.ops.mkldnn._linear_pointwise(rows, lw, b, "gelu", [None], "none")
    return torch.allclose(y, F.gelu(F.conv2d(x, w, b)), atol=1e-5) and torch.allclose(
        z, F.gelu(F.linear(rows, lw, b)), atol=1e-5
    )


@functools.lru_cache(maxsize=1)
def mkldnn_bf16_native() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX512-BF16/AMX); without, its fused ops refuse bf16."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _fusable(x: torch.Tensor, layer: nn.Module) -> bool:
    """oneDNN's fused kernels: CPU inference only (they have no autograd), bf16 only where oneDNN has it."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    dt = _compute_dtype(x)
    return (
        x.device.type == "cpu"
        and not needs_grad
        and (dt == torch.float32 or (dt == torch.bfloat16 and mkldnn_bf16_native()))
        and mkldnn_fusion_available()
    )


class ConvGelu(nn.Module):
    """``gelu(conv(x))`` in one oneDNN kernel on the CPU (the memory-bound stage of TinyViT reads its
    activations once instead of twice); the plain ops elsewhere. Same weights, same results."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if not _fusable(x, c) or c.bias is None or c.padding_mode != "zeros" or isinstance(c.padding, str):
            return F.gelu(c(x))
        dt = _compute_dtype(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x.to(dt),
            c.weight.to(dt),
            c.bias.to(dt),
            list(c.padding),
            list(c.stride),
            list(c.dilation),
            c.groups,
            "gelu",
            [None],
            "none",
        )


class LinearGelu(nn.Module):
    """``gelu(linear(x))`` in one oneDNN kernel on the CPU, the plain ops elsewhere."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.linear
        if not _fusable(x, lin) or lin.bias is None:
            return F.gelu(lin(x))
        dt = _compute_dtype(x)
        return torch.ops.mkldnn._linear_pointwise(x.to(dt), lin.weight.to(dt), lin.bias.to(dt), "gelu", [None], "none")


def fuse_gelu(owner: nn.Module, layer: str, act: str) -> bool:
    """Replace ``owner.<layer>`` (Conv2d/Linear) and the exact GELU ``owner.<act>`` that follows it in
    ``owner.forward`` by one fused module (the act becomes Identity). False when the pair does not fit."""
    lin, gelu = getattr(owner, layer, None), getattr(owner, act, None)
    if not (isinstance(gelu, nn.GELU) and gelu.approximate == "none"):
        return False
    if type(lin) is nn.Conv2d:
        setattr(owner, layer, ConvGelu(lin))
    elif type(lin) is nn.Linear:
        setattr(owner, layer, LinearGelu(lin))
    else:
        return False
    setattr(owner, act, nn.Identity())
    return True


def _sdpa_attention_forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """segment_anything's decoder ``Attention.forward`` through ``scaled_dot_product_attention``."""
    q, k, v = (
        self._separate_heads(p(t), self.num_heads) for p, t in ((self.q_proj, q), (self.k_proj, k), (self.v_proj, v))
    )
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))


def _cached_dense_pe(self) -> torch.Tensor:
    return self._dense_pe_cache


_SWAPPED: dict = {}


def swap_method(module: nn.Module, name: str, function) -> None:
    """Give ``module`` a subclass of its class whose method ``name`` is ``function`` (isinstance still holds)."""
    key = (type(module), name)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"Fast{type(module).__name__}", (type(module),), {name: function})
    module.__class__ = _SWAPPED[key]


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


def _upscaling_as_matmuls(self: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """SAM's decoder upscaling (4x) on pixel rows: each 2x2 stride-2 deconv is one matrix product (the
    kernels do not overlap) and LayerNorm2d a layer norm over each pixel's channels, so the pixels are put in
    place once at the end. The result is NCHW in channels_last memory (the decoder views it as (B, C, HW)).
    On a CPU the bf16 ConvTranspose2d with NCHW input took 5 ms of a 17 ms prompt (docs/benchmarks.md)."""
    up1, norm, _, up2, _ = self.children()
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)  # free when x is NHWC in memory (the decoder's src)
    y = _patch_deconv_rows(rows, cast(nn.ConvTranspose2d, up1))
    weight, bias, eps = cast(torch.Tensor, norm.weight), cast(torch.Tensor, norm.bias), cast(float, norm.eps)
    y = F.gelu(F.layer_norm(y, y.shape[-1:], weight, bias, eps))
    y = F.gelu(_patch_deconv_rows(y, cast(nn.ConvTranspose2d, up2)))
    # rows are ordered (b, i, j, dy1, dx1, dy2, dx2); output pixel (4i + 2 dy1 + dy2, 4j + 2 dx1 + dx2)
    y = y.view(b, h, w, 2, 2, 2, 2, -1).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return y.reshape(b, 4 * h, 4 * w, -1).permute(0, 3, 1, 2)


def optimise_sam_decoder(sam: Sam) -> list:
    """Rewrites for SAM's prompt encoder and mask decoder (exact up to float rounding): the dense positional
    encoding of the 64x64 grid computed once (a non-persistent buffer; it only depends on frozen weights)
    instead of at every decode, the decoder's attention through ``scaled_dot_product_attention``, and its
    upscaling as matrix products (``_upscaling_as_matmuls``)."""
    from segment_anything.modeling.transformer import Attention

    pe = sam.prompt_encoder
    with torch.no_grad():
        pe.register_buffer("_dense_pe_cache", pe.get_dense_pe().detach().clone(), persistent=False)
    swap_method(pe, "get_dense_pe", _cached_dense_pe)
    layers = [m for m in sam.mask_decoder.modules() if type(m) is Attention]
    for m in layers:
        swap_method(m, "forward", _sdpa_attention_forward)
    done = ["dense positional encoding cached", f"{len(layers)} decoder attention layers on SDPA"]
    upscaling = sam.mask_decoder.output_upscaling
    if _upscaling_fits(upscaling):
        swap_method(upscaling, "forward", _upscaling_as_matmuls)
        done.append("decoder upscaling as matrix products")
    return done
