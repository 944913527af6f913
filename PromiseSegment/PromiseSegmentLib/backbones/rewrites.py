"""Load-time rewrites of frozen modules that keep their fp32 outputs (up to rounding): BatchNorm folded into
the convolution before it, conv/linear + GELU fused where oneDNN has the kernel, and ``swap_method`` to give
one module a faster forward (SAM's decoder: ``decoder_rewrites``)."""

from __future__ import annotations

import functools
from typing import Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import nn

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


_SWAPPED: dict = {}


def swap_method(module: nn.Module, name: str, function) -> None:
    """Give ``module`` a subclass of its class whose method ``name`` is ``function`` (isinstance still holds)."""
    key = (type(module), name)
    if key not in _SWAPPED:
        _SWAPPED[key] = type(f"Fast{type(module).__name__}", (type(module),), {name: function})
    module.__class__ = _SWAPPED[key]
