"""The one mode rule, torch-free: what a mode means given an adapter and the user's prompts (the command
line checks it before importing torch; ``promise`` decides with it at run time)."""

from __future__ import annotations

from typing import Optional

from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.names import MODES

APM_MODES = ("apm+ips", "apm+clicks")


def _resolve(mode: str, adapter, has_points: bool, has_box: bool) -> str:
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    has_apm = adapter is not None and adapter.apm is not None
    if mode == "auto":
        if adapter is None:
            return "vanilla"
        if not has_points and not has_box:
            return "apm+ips" if has_apm else "ips"
        if has_apm and not has_box:
            return "apm+clicks"
        return "ips" if ips_for_user_box(adapter) else "vanilla"
    if mode != "vanilla" and adapter is None:
        raise InputError(f"mode {mode} needs an adapter; load one or use vanilla")
    if mode in APM_MODES and not has_apm:
        raise InputError(f"mode {mode} needs an adapter with an APM; this one has IPS only")
    if mode in ("ips", "vanilla") and not has_points and not has_box:
        raise InputError(
            f"mode {mode} needs prompts (points or a box) on every slice it segments; "
            f"use an adapter with an APM for automatic prompts"
        )
    return mode


def ips_for_user_box(adapter) -> bool:
    """Whether "auto" applies the adapter's IPS to the user's own prompts: training measures the adapter
    with ground-truth boxes against the frozen backbone on its selection images and records the verdict
    (``training.ips_for_user_box``); where IPS lost, the frozen decoder serves the user's box. Adapters
    without that record keep IPS."""
    return bool(adapter.training.get("ips_for_user_box", True)) if adapter is not None else False


def resolve_mode(mode: str, adapter, has_points: bool, has_box: bool, box_only: Optional[str] = None) -> str:
    """The one mode rule: what ``mode`` means given the adapter (an ``Adapter``, its ``AdapterMetadata``,
    or None) and the user's prompts. ``box_only``: the name of a backbone trained on box prompts only, on which
    points alone are refused (they segment nothing)."""
    resolved = _resolve(mode, adapter, has_points, has_box)
    if box_only and resolved in ("ips", "vanilla") and not has_box:
        raise InputError(
            f"{box_only} was trained with box prompts only (points alone segment nothing): draw a box (--box), "
            f"or use an adapter with an APM for automatic prompts"
        )
    return resolved
