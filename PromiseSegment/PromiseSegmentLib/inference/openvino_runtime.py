"""The image encoder and the mask decoder in OpenVINO on CPUs: converted from the loaded backbone's own,
unmodified PyTorch modules at first use (the weights file is never changed), cached in the user cache and
compiled for this CPU with the engine's precision (bf16 only where the CPU has it natively, as for PyTorch).

The converted encoder returns the image embedding and the APM's encoder taps. The converted decoder takes
the embedding, the prompt encoder's sparse (any number of tokens) and dense embeddings and the IPS shift,
and returns every mask token's logits and IoU (the choice of token stays in PyTorch): 1.5x faster than
PyTorch's fp32 decoder on the 2-core AVX2 EPYC, equal within 2e-5. The prompt encoder and the APM stay in
PyTorch: they take well under a millisecond, and box corners must stay exact.

Cache entry: ``<cache>/openvino/<key>/`` with ``<kind>.xml``, ``<kind>.bin`` and ``manifest.json`` (the
SHA-256 of the .bin), written as one unit; the key covers the weights' SHA-256, the backbone, the model kind,
the OpenVINO version and the input shape. An entry that does not read back or does not match its manifest
is rebuilt.
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
from PromiseSegmentLib.model.decoder import decode_all_tokens
from PromiseSegmentLib.paths import cache_dir

log = logging.getLogger(__name__)

ENCODER_LAYOUT = 1  # bump when what a converted model returns changes: old cache entries are then unused
DECODER_LAYOUT = 1
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


class _DecoderAllTokens(torch.nn.Module):
    """The backbone's mask decoder as one module: (embedding, sparse, dense, IPS shift) -> every token's
    logits and IoU."""

    def __init__(self, backbone: LoadedBackbone):
        super().__init__()
        self.sam = backbone.sam

    def forward(self, features, sparse, dense, shift):
        return decode_all_tokens(self.sam, features, sparse, dense, shift)


def _cache_key(backbone: LoadedBackbone, version: str, kind: str = "encoder") -> str:
    size = backbone.spec.image_size
    if kind == "encoder":  # the text of the first release: its cache entries stay valid
        text = f"{backbone.name}|{backbone.identity}|openvino {version}|input 1x3x{size}x{size}|layout {ENCODER_LAYOUT}"
    else:
        text = f"{backbone.name}|{backbone.identity}|openvino {version}|{kind}|layout {DECODER_LAYOUT}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class _ConvertedModel:
    """One of the backbone's modules, converted once into the cache and compiled for this CPU."""

    kind = ""
    layout = 0

    def __init__(self, backbone: LoadedBackbone, precision: str, threads: int):
        import openvino as ov

        self.backbone, self.threads = backbone, threads
        self.hint = "bf16" if precision == "bf16" else "f32"
        self.version = openvino_version() or ""
        self.folder = cache_dir() / "openvino" / _cache_key(backbone, self.version, self.kind)
        self.core = ov.Core()
        self.conversion_seconds: Optional[float] = None  # set when this process converted the model
        self.model = self._cached_model() or self._convert()
        self._compiled: Optional[object] = None

    def _traced(self) -> Tuple[torch.nn.Module, tuple, Optional[list]]:
        """(module, example input, input shapes with -1 where dynamic, or None: the example's)."""
        raise NotImplementedError

    # -------------------------------------------------------------------------- the cache entry
    def _cached_model(self):
        names = (f"{self.kind}.xml", f"{self.kind}.bin", "manifest.json")
        xml, weights, manifest = (self.folder / n for n in names)
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
        module, example, shapes = self._traced()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the shapes it names are fixed
            model = ov.convert_model(module.eval(), example_input=example, input=shapes)
        self.folder.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.folder.parent, prefix=".convert-") as tmp:
            ov.save_model(model, str(Path(tmp) / f"{self.kind}.xml"), compress_to_fp16=False)
            xml, weights = (Path(tmp) / f"{self.kind}.xml").read_bytes(), (Path(tmp) / f"{self.kind}.bin").read_bytes()
        manifest = {"bin_sha256": hashlib.sha256(weights).hexdigest(), "backbone": self.backbone.name}
        manifest.update(identity=self.backbone.identity, openvino=self.version, layout=self.layout)
        self.folder.mkdir(exist_ok=True)
        write_all(
            [
                bytes_output(self.folder / f"{self.kind}.xml", xml),
                bytes_output(self.folder / f"{self.kind}.bin", weights),
                bytes_output(self.folder / "manifest.json", json.dumps(manifest).encode()),
            ],
            overwrite=True,
        )
        self.conversion_seconds = time.perf_counter() - started
        log.info(
            "converted the %s %s to OpenVINO in %.0f s (cached in %s)",
            self.backbone.name,
            self.kind,
            self.conversion_seconds,
            self.folder,
        )
        return model

    # -------------------------------------------------------------------------- running
    def _compiled_model(self):
        if self._compiled is None:
            config = {
                "INFERENCE_PRECISION_HINT": self.hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads,
            }
            with signal_stack.kept():
                self._compiled = self.core.compile_model(self.model, "CPU", config)
        return self._compiled

    def _run(self, *inputs: torch.Tensor) -> List[np.ndarray]:
        compiled = self._compiled_model()
        arrays = tuple(np.ascontiguousarray(t.detach().float().cpu().numpy()) for t in inputs)
        with signal_stack.kept():  # the plugin's own signal stack must not outlive the call (signal_stack)
            results = compiled(arrays)  # type: ignore[operator]
        return [np.array(results[i]) for i in range(len(compiled.outputs))]  # type: ignore[attr-defined]


class OpenVinoEncoder(_ConvertedModel):
    """``encoder(x)`` -> (features, taps) as torch tensors, for a (B, 3, S, S) float32 input on the CPU.

    Compiled for batch 1: the converted trace keeps batch-1 shapes inside (``reshape`` to a larger batch
    fails), and on CPUs a batch gains nothing over its images one after another in latency mode
    (Testing/benchmarks/openvino_modes.py)."""

    kind, layout = "encoder", ENCODER_LAYOUT

    def _traced(self):
        plain = self.backbone  # the encoder as built: PyTorch-only rewrites (fused oneDNN kernels) do not convert
        if plain.rewrites:
            plain = self.backbone.spec.load(self.backbone.path, optimise=False)
        size = self.backbone.spec.image_size
        return _EncoderWithTaps(plain), (torch.zeros(1, 3, size, size),), None

    def __call__(self, x: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        per_image = [self._run(one) for one in x.split(1)]
        outputs = [torch.from_numpy(np.concatenate(parts)) for parts in zip(*per_image)]
        return outputs[0], outputs[1:]


class OpenVinoDecoder(_ConvertedModel):
    """``decoder(features, sparse, dense, shift)`` -> (logits (1, T, 256, 256), IoU (1, T)) for every mask
    token, one image and one prompt set; ``shift`` None is no IPS shift."""

    kind, layout = "decoder", DECODER_LAYOUT

    def _traced(self):
        dec = self.backbone.sam.mask_decoder
        tokens = dec.num_mask_tokens
        example = (torch.zeros(1, 256, 64, 64), torch.zeros(1, 2, 256), torch.zeros(1, 256, 64, 64))
        example += (torch.zeros(1, tokens, 256),)
        shapes = [[1, 256, 64, 64], [1, -1, 256], [1, 256, 64, 64], [1, tokens, 256]]  # any number of prompts
        return _DecoderAllTokens(self.backbone), example, shapes

    def __call__(self, features, sparse, dense, shift=None) -> Tuple[torch.Tensor, torch.Tensor]:
        if shift is None:
            shift = torch.zeros(1, self.backbone.sam.mask_decoder.num_mask_tokens, 256)
        masks, iou = self._run(features, sparse, dense, shift)
        return torch.from_numpy(masks), torch.from_numpy(iou)
