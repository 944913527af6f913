"""Speed without surprises: the numeric precision an engine runs in, thread and batch settings, the
out-of-memory back-off, and rewrites of frozen modules that keep their fp32 outputs (up to rounding).

Precision (``SamEngine(precision=...)``):

- ``fp32``: full precision; the reference numerics (the module rewrites below change outputs by ~1e-6).
- ``bf16``: bfloat16 autocast for the encoder and decoder. On a CPU only with native bf16 instructions
  (AVX512-BF16 or AMX on x86, BF16 on Arm), because emulated bf16 is slower than fp32; elsewhere it
  falls back to fp32 and says why. On CUDA: bf16, or fp16 where the GPU lacks bf16.
- ``fp16``: CUDA only (a CPU gets fp32).
- ``auto``: the fastest mode whose masks were measured to agree with fp32 (mean Dice >= 0.99): CUDA
  bf16/fp16; a CPU with native bf16 for backbones that declare it (``Backbone.cpu_bf16``); else fp32.

``PROMISE_SEGMENT_CPU_BF16=0`` in the environment keeps every CPU engine in fp32.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import platform
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from PromiseSegmentLib.names import PRECISIONS  # noqa: E402  (torch-free, for the command line's choices)

CPU_BF16_ENV = "PROMISE_SEGMENT_CPU_BF16"
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------- precision
@dataclass(frozen=True)
class Precision:
    """What an engine computes in (``name``: fp32/bf16/fp16) and why (``note``, shown to the user)."""

    name: str
    note: str = ""

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return _DTYPES[self.name]

    def autocast(self, device: torch.device):
        """Autocast for ``device`` in this precision; a no-op context for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def cpu_bf16() -> Tuple[bool, str]:
    """(whether this CPU runs bf16 natively and correctly, the reason in words)."""
    if os.environ.get(CPU_BF16_ENV, "").strip() == "0":
        return False, f"bf16 switched off by {CPU_BF16_ENV}=0"
    return _cpu_bf16_hardware()


@functools.lru_cache(maxsize=1)
def _cpu_bf16_hardware() -> Tuple[bool, str]:
    if not torch.backends.mkldnn.is_available():
        return False, "this PyTorch build has no oneDNN (bf16 on the CPU would be slow)"
    try:
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            # oneDNN also "supports" bf16 on plain AVX-512 by emulation, which is slower than fp32.
            native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
            what = "AVX512-BF16/AMX"
        else:
            native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
            what = "BF16 instructions"
    except (AttributeError, RuntimeError):
        return False, "this PyTorch cannot tell whether the CPU has bf16; fp32"
    if not native:
        return False, f"the CPU has no {what} (bf16 would be emulated, slower than fp32)"
    if not _bf16_self_test():
        return False, "bf16 kernels gave wrong results on this CPU; fp32"
    return True, f"the CPU has {what}"


def _bf16_self_test() -> bool:
    """Run a small conv + linear under bf16 autocast and compare with fp32: catches broken kernels."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 8, 16, 16, generator=gen), torch.randn(16, 8, 3, 3, generator=gen)
    lin = torch.randn(32, 16, generator=gen)
    try:
        with torch.no_grad(), torch.autocast("cpu", enabled=False):  # callers may be inside autocast
            ref = F.linear(F.conv2d(x, w, padding=1).mean((2, 3)), lin)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = F.linear(F.conv2d(x, w, padding=1).mean((2, 3)), lin).float()
    except RuntimeError:
        return False
    return bool((out - ref).abs().max() <= 0.05 * ref.abs().max())


def resolve_precision(requested: str, device: torch.device, cpu_bf16_measured: bool) -> Precision:
    """The precision an engine on ``device`` runs for ``requested`` (one of ``PRECISIONS``);
    ``cpu_bf16_measured``: the backbone's bf16 masks were shown to agree with fp32 on a CPU."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "fp32":
        return Precision("fp32", "full precision, as asked")
    if device.type == "cuda":
        if requested == "fp16" or not torch.cuda.is_bf16_supported():
            return Precision("fp16", "fp16 autocast" + ("" if requested == "fp16" else " (this GPU has no bf16)"))
        return Precision("bf16", "bf16 autocast on the GPU")
    if device.type != "cpu":
        return Precision("fp32", f"reduced precision is not used on {device.type}")
    if requested == "fp16":
        return Precision("fp32", "fp16 is not faster on CPUs; fp32")
    ok, why = cpu_bf16()
    if not ok:
        return Precision("fp32", why)
    if requested == "auto" and not cpu_bf16_measured:
        return Precision("fp32", "bf16 agreement not measured for this backbone (ask for bf16 to use it)")
    return Precision("bf16", f"bf16 autocast: {why}")


# ----------------------------------------------------------------------------------------- threads
def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return n


def configure_threads(threads: Optional[int] = None) -> int:
    """Set PyTorch's compute threads: ``threads`` if given, else no more than the CPUs this process may
    use (PyTorch counts the host's cores, which oversubscribes a container). Returns the number in use."""
    if threads:
        torch.set_num_threads(int(threads))
    elif torch.get_num_threads() > available_cpus():
        torch.set_num_threads(available_cpus())
    return torch.get_num_threads()


# ----------------------------------------------------------------------------------------- batches
CPU_BATCH = 1  # measured on 2 cores: batch 8 is slower per image than batch 1 (memory-bound stage 0)
OTHER_BATCH = 4  # devices whose free memory cannot be read (MPS)
MAX_BATCH = 64


def batch_size_for_memory(free_bytes: int, per_image_bytes: int, cap: int = MAX_BATCH, share: float = 0.5) -> int:
    """Images per encoder batch that fit in ``share`` of the free device memory (at least 1); the
    out-of-memory back-off corrects an estimate that was too optimistic."""
    return max(1, min(cap, int(free_bytes * share) // max(1, int(per_image_bytes))))


def auto_batch_size(device: torch.device, per_image_bytes: int) -> int:
    if device.type == "cpu":
        return CPU_BATCH
    if device.type == "cuda":
        return batch_size_for_memory(torch.cuda.mem_get_info(device)[0], per_image_bytes)
    return OTHER_BATCH


def after_out_of_memory(batch_size: int, on_cpu: bool) -> Tuple[int, bool]:
    """The next step after an out-of-memory error: (new batch size, encode on the CPU from now on).
    Halve the batch; at batch 1 move the encoding to the CPU; on the CPU at batch 1 give up."""
    if batch_size > 1:
        return batch_size // 2, on_cpu
    if not on_cpu:
        return 1, True
    raise MemoryError("out of memory on the CPU while encoding one image")


def cpu_clone(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose tensors live on the CPU, made without allocating on the module's own
    device (after an out-of-memory error there is no room for a device-side copy). CPU tensors are
    shared, not copied: frozen weights are read-only."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        cpu = t.detach().cpu()
        memo[id(t)] = nn.Parameter(cpu, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cpu
    return copy.deepcopy(module, memo)


# ----------------------------------------------------------------------------------------- rewrites
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """One conv computing ``bn(conv(x))`` with the BatchNorm's running statistics (inference only)."""
    gamma = bn.weight if bn.affine else torch.ones_like(bn.running_var)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    scale = gamma / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused.bias.copy_((bias - bn.running_mean) * scale + beta)
    fused.requires_grad_(conv.weight.requires_grad)
    return fused.to(conv.weight.device).eval()


def fold_batchnorm(root: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an ``nn.Sequential`` into that conv
    (a Sequential of exactly the two becomes the conv). BatchNorms in training mode are left alone.
    Returns how many were folded."""
    count = 0
    for name, child in list(root.named_children()):
        mods = list(child) if isinstance(child, nn.Sequential) else []
        if len(mods) == 2 and _foldable(*mods):
            setattr(root, name, fold_conv_bn(*mods))
            count += 1
            continue
        for i in range(len(mods) - 1):
            if _foldable(mods[i], mods[i + 1]):
                child[i], child[i + 1] = fold_conv_bn(mods[i], mods[i + 1]), nn.Identity()
                count += 1
        count += fold_batchnorm(child)
    return count


def _foldable(a: nn.Module, b: nn.Module) -> bool:
    return (type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d and not b.training
            and b.track_running_stats and b.running_var is not None and b.num_features == a.out_channels)


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
    return (torch.allclose(y, F.gelu(F.conv2d(x, w, b)), atol=1e-5)
            and torch.allclose(z, F.gelu(F.linear(rows, lw, b)), atol=1e-5))


def _fusable(x: torch.Tensor, layer: nn.Module) -> bool:
    """oneDNN's fused kernels: CPU inference only (they have no autograd)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
    return (x.device.type == "cpu" and not needs_grad and x.dtype in (torch.float32, torch.bfloat16)
            and mkldnn_fusion_available())


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
        return torch.ops.mkldnn._convolution_pointwise(x.to(dt), c.weight.to(dt), c.bias.to(dt), list(c.padding),
                                                       list(c.stride), list(c.dilation), c.groups, "gelu", [None],
                                                       "none")


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
        return torch.ops.mkldnn._linear_pointwise(x.to(dt), lin.weight.to(dt), lin.bias.to(dt), "gelu", [None],
                                                  "none")


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
    q, k, v = (self._separate_heads(p(t), self.num_heads) for p, t in ((self.q_proj, q), (self.k_proj, k),
                                                                          (self.v_proj, v)))
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


def optimise_sam_decoder(sam: nn.Module) -> list:
    """Rewrites for SAM's prompt encoder and mask decoder (exact up to float rounding): the dense positional
    encoding of the 64x64 grid computed once (a non-persistent buffer; it only depends on frozen weights)
    instead of at every decode, and the decoder's attention through ``scaled_dot_product_attention``."""
    from segment_anything.modeling.transformer import Attention

    pe = sam.prompt_encoder
    with torch.no_grad():
        pe.register_buffer("_dense_pe_cache", pe.get_dense_pe().detach().clone(), persistent=False)
    swap_method(pe, "get_dense_pe", _cached_dense_pe)
    layers = [m for m in sam.mask_decoder.modules() if type(m) is Attention]
    for m in layers:
        swap_method(m, "forward", _sdpa_attention_forward)
    return ["dense positional encoding cached", f"{len(layers)} decoder attention layers on SDPA"]
