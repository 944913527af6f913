"""Device choice: CUDA, then Apple MPS, then CPU, unless the user names one."""

from __future__ import annotations

from typing import Optional

import torch


def pick_device(name: Optional[str] = None) -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device 'mps' was asked for but Apple MPS is not available; use --device cpu or auto")
    return dev


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA/MPS out-of-memory, or the CPU allocator refusing a batch too large for the RAM."""
    text = str(exc).lower()
    return isinstance(exc, (torch.cuda.OutOfMemoryError, getattr(torch, "OutOfMemoryError", ()))) or any(
        s in text for s in ("out of memory", "not enough memory", "can't allocate memory")
    )
