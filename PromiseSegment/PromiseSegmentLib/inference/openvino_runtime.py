"""The image encoder in OpenVINO on CPUs: converted from the loaded backbone's own, unmodified PyTorch
modules at first use (the weights file is never changed), cached in the user cache and compiled for this
CPU with the engine's precision (bf16 only where the CPU has it natively, as for PyTorch).

The converted model returns the image embedding and the APM's encoder taps. Where the backbone keeps its
encoder's first layers in fp32 (``fp32_head``: LiteMedSAM's stage 0), they are a model of their own
compiled in f32 and the rest runs in the engine's precision, as in PyTorch: as one bf16 model a trained
adapter's automatic masks moved below the agreement bar (docs/benchmarks.md), and marking the nodes
``disable_fp16_compression`` does not keep them in f32 under a bf16 hint. The mask decoder,
the prompt encoder and the APM stay in PyTorch: they run on one 64x64 embedding in milliseconds, and their
inputs (box corners) must stay exact.

Cache entry: ``<cache>/openvino/<key>/`` with ``<part>.xml`` and ``<part>.bin`` for each part (``head``,
``encoder``) and ``manifest.json`` (the SHA-256 of each .bin), written as one unit; the key covers the
weights' SHA-256, the backbone, the OpenVINO version, the input shape and the parts. An entry that does not
read back or does not match its manifest is rebuilt.
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
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from PromiseSegmentLib.atomic_write import bytes_output, write_all
from PromiseSegmentLib.backbones.base import LoadedBackbone
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.inference import signal_stack
from PromiseSegmentLib.paths import cache_dir

log = logging.getLogger(__name__)

ENCODER_LAYOUT = 2  # bump when what the converted model returns changes: old cache entries are then unused
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


class _EncoderPart(torch.nn.Module):
    """One part of the backbone's encoder as a module: ``head`` (its fp32 first layers), or ``encoder`` (the
    rest, or all of it where there is no head), which returns the embedding first, then every APM tap."""

    def __init__(self, backbone: LoadedBackbone, part: str, after_head: bool):
        super().__init__()
        self.spec, self.sam, self.part, self.after_head = backbone.spec, backbone.sam, part, after_head

    def forward(self, x: torch.Tensor):
        if self.part == "head":
            return self.spec.encode_head(self.sam, x)
        encode = self.spec.encode_tail if self.after_head else self.spec.encode
        features, taps = encode(self.sam, x, True)
        return (features, *taps)


def encoder_parts(backbone: LoadedBackbone) -> Tuple[str, ...]:
    """The models the encoder is converted into, in the order they run."""
    return ("head", "encoder") if backbone.spec.fp32_head else ("encoder",)


def _cache_key(backbone: LoadedBackbone, version: str) -> str:
    size, parts = backbone.spec.image_size, "+".join(encoder_parts(backbone))
    text = f"{backbone.name}|{backbone.identity}|openvino {version}|input 1x3x{size}x{size}|layout {ENCODER_LAYOUT}"
    return hashlib.sha256(f"{text}|{parts}".encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _static_shapes(models: list, image_size: int) -> list:
    """The converted models have dynamic input shapes (any batch and size). Fixed to one image of the
    backbone's size (each part's input the previous part's output), the CPU plugin plans its buffers once at
    compile time, in less memory, instead of re-planning for the shapes of every call."""
    shape = [1, 3, image_size, image_size]
    for model in models:
        model.reshape(shape)
        shape = list(model.outputs[0].get_shape())
    return [*models[:-1], _nhwc_outputs(models[-1])]


def _nhwc_outputs(model):
    """The encoder's (B, C, H, W) outputs handed over in NHWC memory, the layout the APM and the decoder read:
    the plugin writes them so from its own blocked layout instead of PyTorch copying NCHW into NHWC after
    every encode (15 MB per slice)."""
    import openvino as ov

    ppp = ov.preprocess.PrePostProcessor(model)
    for i, output in enumerate(model.outputs):
        if len(output.get_partial_shape()) == 4:
            ppp.output(i).model().set_layout(ov.Layout("NCHW"))
            ppp.output(i).tensor().set_layout(ov.Layout("NHWC"))
    return ppp.build()


class OpenVinoEncoder:
    """``encoder(x)`` -> (features, taps) as torch tensors, for a (B, 3, S, S) float32 input on the CPU."""

    def __init__(self, backbone: LoadedBackbone, precision: str, threads: int):
        import openvino as ov

        self.backbone, self.threads = backbone, threads
        self.parts = encoder_parts(backbone)
        hint = "bf16" if precision == "bf16" else "f32"
        self.hints = {part: "f32" if part == "head" else hint for part in self.parts}  # the head stays f32
        self.version = openvino_version() or ""
        self.folder = cache_dir() / "openvino" / _cache_key(backbone, self.version)
        self.core = ov.Core()
        self.conversion_seconds: Optional[float] = None  # set when this process converted the model
        self.models = _static_shapes(self._cached_models() or self._convert(), backbone.spec.image_size)
        self._compiled: Optional[list] = None

    # -------------------------------------------------------------------------- the cache entry
    def _cached_models(self) -> Optional[list]:
        manifest = self.folder / "manifest.json"
        files = [(self.folder / f"{part}.xml", self.folder / f"{part}.bin") for part in self.parts]
        if not (manifest.is_file() and all(x.is_file() and b.is_file() for x, b in files)):
            return None
        try:
            sums = json.loads(manifest.read_text())["bin_sha256"]
            models = []
            for part, (xml, weights) in zip(self.parts, files):
                if sums[part] != _sha256(weights):
                    raise ValueError(f"the weights of {part} do not match its manifest")
                models.append(self.core.read_model(str(xml)))
            return models
        except Exception as exc:  # OpenVINO's own error types, a broken manifest: rebuild either way
            log.warning("the OpenVINO cache entry %s is damaged (%s); converting again", self.folder, exc)
            shutil.rmtree(self.folder, ignore_errors=True)
            return None

    def _convert(self) -> list:
        import openvino as ov

        started = time.perf_counter()
        plain = self.backbone  # the encoder as built: PyTorch-only rewrites (fused oneDNN kernels) do not convert
        if plain.rewrites:
            plain = self.backbone.spec.load(self.backbone.path, optimise=False)
        size = self.backbone.spec.image_size
        example = torch.zeros(1, 3, size, size)
        models, files = [], []
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder.parent, prefix=".convert-") as tmp:
            for part in self.parts:
                module = _EncoderPart(plain, part, after_head="head" in self.parts).eval()
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shapes are fixed: the trace holds
                    models.append(ov.convert_model(module, example_input=example))
                    example = module(example) if part == "head" else example  # the next part's input
                ov.save_model(models[-1], str(Path(tmp) / f"{part}.xml"), compress_to_fp16=False)
                files += [(part, ext, (Path(tmp) / f"{part}.{ext}").read_bytes()) for ext in ("xml", "bin")]
        sums = {part: hashlib.sha256(data).hexdigest() for part, ext, data in files if ext == "bin"}
        manifest: Dict[str, object] = {"bin_sha256": sums, "backbone": self.backbone.name, "parts": list(self.parts)}
        manifest.update(identity=self.backbone.identity, openvino=self.version, layout=ENCODER_LAYOUT)
        self.folder.mkdir(exist_ok=True)
        outputs = [bytes_output(self.folder / f"{part}.{ext}", data) for part, ext, data in files]
        outputs.append(bytes_output(self.folder / "manifest.json", json.dumps(manifest).encode()))
        write_all(outputs, overwrite=True)
        self.conversion_seconds = time.perf_counter() - started
        log.info(
            "converted the %s encoder to OpenVINO in %.0f s (cached in %s)",
            self.backbone.name,
            self.conversion_seconds,
            self.folder,
        )
        return models

    # -------------------------------------------------------------------------- running
    def _compiled_models(self) -> list:
        """Compiled once, for batch 1: the converted trace keeps batch-1 shapes inside (``reshape`` to a
        larger batch fails), and on CPUs a batch gains nothing over its images one after another in latency
        mode (Testing/benchmarks/openvino_modes.py)."""
        if self._compiled is None:
            compiled = []
            for part, model in zip(self.parts, self.models):
                config = {
                    "INFERENCE_PRECISION_HINT": self.hints[part],
                    "PERFORMANCE_HINT": "LATENCY",
                    "INFERENCE_NUM_THREADS": self.threads,
                }
                with signal_stack.kept():
                    compiled.append(self.core.compile_model(model, "CPU", config))
            self._compiled = compiled
        return self._compiled

    def release(self) -> None:
        """Free the compiled models and their activation buffers (a few hundred MB); the next call compiles
        them again (seconds)."""
        self._compiled = None

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        *head, encoder = self._compiled_models()
        per_image = []
        for one in x.detach().float().cpu().split(1):
            inputs = np.ascontiguousarray(one.numpy())
            with signal_stack.kept():  # the plugin's own signal stack must not outlive the call (signal_stack)
                for model in head:
                    inputs = model(inputs)[0]
                results = encoder(inputs)
            per_image.append([np.array(results[i]) for i in range(len(encoder.outputs))])
        outputs = [_from_nhwc(torch.from_numpy(np.concatenate(parts))) for parts in zip(*per_image)]
        return outputs[0], outputs[1:]


def _from_nhwc(t: torch.Tensor) -> torch.Tensor:
    """An NHWC array (``_nhwc_outputs``) as the (B, C, H, W) tensor it is, in channels_last memory (a view)."""
    return t.permute(0, 3, 1, 2) if t.dim() == 4 else t


def release_compiled_encoders(backbone: LoadedBackbone) -> None:
    """Free the compiled OpenVINO encoders of ``backbone`` while no encoding is coming (training on cached
    features); each is compiled again at its next use."""
    for encoder in backbone.openvino_encoders.values():
        encoder.release()
