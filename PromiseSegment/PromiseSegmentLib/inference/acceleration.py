"""Speed without surprises: the numeric precision an engine runs in, thread and batch settings, the
out-of-memory back-off (the load-time module rewrites are in ``backbones.rewrites``).

Precision (``InferenceEngine(precision=...)``):

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
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from PromiseSegmentLib.names import PRECISIONS  # noqa: E402  (torch-free, for the command line's choices)

if TYPE_CHECKING:
    pass

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
