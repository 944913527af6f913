"""The image encoder in OpenVINO on CPUs: converted from the loaded backbone's own, unmodified PyTorch
modules at first use (the weights file is never changed), cached in the user cache and compiled for this
CPU with the engine's precision (bf16 only where the CPU has it natively, as for PyTorch).

The converted model returns the image embedding and the APM's encoder taps. The mask decoder, the prompt
encoder and the APM stay in PyTorch: they run on one 64x64 embedding in milliseconds, and their inputs
(box corners) must stay exact.

Cache entry: ``<cache>/openvino/<key>/`` with ``encoder.xml``, ``encoder.bin`` and ``manifest.json`` (the
SHA-256 of the .bin), written as one unit; the key covers the weights' SHA-256, the backbone, the OpenVINO
version and the input shape. An entry that does not read back or does not match its manifest is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

from PromiseSegmentLib.atomic_write import bytes_output, write_all
from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.inference import signal_stack
from PromiseSegmentLib.paths import cache_dir

log = logging.getLogger(__name__)

ENCODER_LAYOUT = 1  # bump when what the converted model returns changes: old cache entries are then unused
INSTALL_HINT = 'pip install "promise-segment[openvino]"'


def openvino_version() -> Optional[str]:
    """The installed OpenVINO's version, or None."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.get_version()).split("-")[0]


def resolve_runtime(requested: str, device: torch.device, backbone: LoadedBackbone) -> Tuple[str, str]:
    """(runtime, why) for the encoder: ``auto`` is OpenVINO on a CPU when it is installed and measured for
    this backbone, else PyTorch; GPUs stay on PyTorch."""
    if requested == "torch":
        return "torch", "asked for"
    if device.type != "cpu":
        if requested == "openvino":
            raise InputError(f"--runtime openvino runs on CPUs; on {device.type} use --runtime torch (or auto)")
        return "torch", f"{device.type}: PyTorch"
    version = openvino_version()
    if version is None:
        if requested == "openvino":
            raise InputError(f"--runtime openvino needs OpenVINO: {INSTALL_HINT}")
        return "torch", f"OpenVINO is not installed ({INSTALL_HINT} for a faster CPU encoder)"
    if requested == "auto" and not backbone.spec.openvino_measured:
        return "torch", f"OpenVINO not measured for {backbone.name}"
    return "openvino", f"OpenVINO {version}"


class _EncoderWithTaps(torch.nn.Module):
    """The backbone's encoder as one module: embedding first, then every APM tap."""

    def __init__(self, backbone: LoadedBackbone):
        super().__init__()
        self.spec, self.sam = backbone.spec, backbone.sam

    def forward(self, x: torch.Tensor):
        features, taps = self.spec.encode(self.sam, x, True)
        return (features, *taps)


def _cache_key(backbone: LoadedBackbone, version: str) -> str:
    size = backbone.spec.image_size
    text = f"{backbone.name}|{backbone.identity}|openvino {version}|input 1x3x{size}x{size}|layout {ENCODER_LAYOUT}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class OpenVinoEncoder:
    """``encoder(x)`` -> (features, taps) as torch tensors, for a (B, 3, S, S) float32 input on the CPU."""

    def __init__(self, backbone: LoadedBackbone, precision: str, threads: int):
        import openvino as ov

        self.backbone, self.threads = backbone, threads
        self.hint = "bf16" if precision == "bf16" else "f32"
        self.version = openvino_version() or ""
        self.folder = cache_dir() / "openvino" / _cache_key(backbone, self.version)
        self.core = ov.Core()
        self.conversion_seconds: Optional[float] = None  # set when this process converted the model
        self.model = self._cached_model() or self._convert()
        self._compiled: Optional[object] = None

    # -------------------------------------------------------------------------- the cache entry
    def _cached_model(self):
        xml, weights, manifest = (self.folder / n for n in ("encoder.xml", "encoder.bin", "manifest.json"))
        if not (xml.is_file() and weights.is_file() and manifest.is_file()):
            return None
        try:
            if json.loads(manifest.read_text())["bin_sha256"] != _sha256(weights):
                raise ValueError("its weights do not match its manifest")
            return self.core.read_model(str(xml))
        except Exception as exc:  # OpenVINO's own error types, a broken manifest: rebuild either way
            log.warning("the OpenVINO cache entry %s is damaged (%s); converting again", self.folder, exc)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None

    def _convert(self):
        import openvino as ov

        started = time.perf_counter()
        plain = self.backbone  # the encoder as built: PyTorch-only rewrites (fused oneDNN kernels) do not convert
        if plain.rewrites:
            plain = self.backbone.spec.load(self.backbone.path, optimise=False)
        size = self.backbone.spec.image_size
        example = torch.zeros(1, 3, size, size)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed: the trace holds
            model = ov.convert_model(_EncoderWithTaps(plain).eval(), example_input=example)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder.parent, prefix=".convert-") as tmp:
            ov.save_model(model, str(Path(tmp) / "encoder.xml"), compress_to_fp16=False)
            xml, weights = (Path(tmp) / "encoder.xml").read_bytes(), (Path(tmp) / "encoder.bin").read_bytes()
        manifest = {"bin_sha256": hashlib.sha256(weights).hexdigest(), "backbone": self.backbone.name}
        manifest.update(identity=self.backbone.identity, openvino=self.version, layout=ENCODER_LAYOUT)
        self.folder.mkdir(exist_ok=True)
        write_all(
            [
                bytes_output(self.folder / "encoder.xml", xml),
                bytes_output(self.folder / "encoder.bin", weights),
                bytes_output(self.folder / "manifest.json", json.dumps(manifest).encode()),
            ],
            overwrite=True,
        )
        self.conversion_seconds = time.perf_counter() - started
        log.info(
            "converted the %s encoder to OpenVINO in %.0f s (cached in %s)",
            self.backbone.name,
            self.conversion_seconds,
            self.folder,
        )
        return model

    # -------------------------------------------------------------------------- running
    def _compiled_model(self):
        """Compiled once, for batch 1: the converted trace keeps batch-1 shapes inside (``reshape`` to a
        larger batch fails), and on CPUs a batch gains nothing over its images one after another in latency
        mode (Testing/benchmarks/openvino_modes.py)."""
        if self._compiled is None:
            config = {
                "INFERENCE_PRECISION_HINT": self.hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads,
            }
            with signal_stack.kept():
                self._compiled = self.core.compile_model(self.model, "CPU", config)
        return self._compiled

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        compiled = self._compiled_model()
        per_image = []
        for one in x.detach().float().cpu().split(1):
            with signal_stack.kept():  # the plugin's own signal stack must not outlive the call (signal_stack)
                results = compiled(np.ascontiguousarray(one.numpy()))  # type: ignore[operator]
            per_image.append([np.array(results[i]) for i in range(len(compiled.outputs))])  # type: ignore[attr-defined]
        outputs = [torch.from_numpy(np.concatenate(parts)) for parts in zip(*per_image)]
        return outputs[0], outputs[1:]
