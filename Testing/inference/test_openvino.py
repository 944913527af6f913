"""The OpenVINO encoder runtime: which runtime runs and why, the converted encoder against PyTorch's, and
its cache entry (written once, read back, rebuilt when damaged)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.inference import openvino_runtime
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.inference.openvino_runtime import resolve_runtime

CPU, GPU = torch.device("cpu"), torch.device("cuda")
LIB = Path(__file__).resolve().parents[2] / "PromiseSegment"


def test_which_runtime_runs_and_why(lite_medsam, tiny_backbone, monkeypatch):
    assert resolve_runtime("torch", CPU, lite_medsam) == ("torch", "asked for")
    assert resolve_runtime("auto", CPU, lite_medsam)[0] == "openvino"  # installed (the test extra) and measured
    assert resolve_runtime("auto", GPU, lite_medsam)[0] == "torch"  # GPUs stay on PyTorch CUDA
    with pytest.raises(InputError, match="runs on CPUs"):
        resolve_runtime("openvino", GPU, lite_medsam)
    runtime, why = resolve_runtime("auto", CPU, tiny_backbone)
    assert runtime == "torch" and "not measured" in why  # auto only where it was measured
    assert resolve_runtime("openvino", CPU, tiny_backbone)[0] == "openvino"  # asked for: tried
    monkeypatch.setattr(openvino_runtime, "openvino_version", lambda: None)
    runtime, why = resolve_runtime("auto", CPU, lite_medsam)
    assert runtime == "torch" and "promise-segment[openvino]" in why
    with pytest.raises(InputError, match=r"needs OpenVINO: pip install"):
        resolve_runtime("openvino", CPU, lite_medsam)


def _images(n, size=(200, 170), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, (*size, 3), dtype=np.uint8) for _ in range(n)]


def test_the_openvino_encoder_gives_pytorchs_embedding_and_taps(lite_medsam):
    reference = InferenceEngine(lite_medsam, "cpu", precision="fp32", capture_taps=True)
    converted = InferenceEngine(lite_medsam, "cpu", precision="fp32", capture_taps=True, runtime="openvino")
    assert "encoder in OpenVINO" in converted.describe() and "encoder in PyTorch" in reference.describe()
    images = _images(2)
    for a, b in zip(reference.encode(images), converted.encode(images)):
        assert a.input_size == b.input_size and a.original_size == b.original_size
        assert torch.allclose(a.features, b.features, atol=1e-3)
        assert len(a.taps) == len(b.taps) == 3
        assert all(torch.allclose(x, y, atol=1e-3) for x, y in zip(a.taps, b.taps))
        assert b.features.is_contiguous(memory_format=torch.channels_last)  # the decoder's layout


def test_a_batch_gives_what_its_images_give_one_by_one(lite_medsam):
    """LiteMedSAM's converted trace holds batch-1 shapes (``reshape`` to 2 fails); a batch (``--batch-size``
    on a CPU) must still give each image's own embedding and taps, in order."""
    engine = InferenceEngine(lite_medsam, "cpu", precision="fp32", capture_taps=True, runtime="openvino")
    engine.prepare_runtime()
    size = engine.spec.image_size
    batch = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    features, taps = engine._openvino(batch)
    for i in range(2):
        one, one_taps = engine._openvino(batch[i : i + 1])
        assert torch.equal(features[i : i + 1], one)
        assert all(torch.equal(t[i : i + 1], u) for t, u in zip(taps, one_taps))
    assert not torch.allclose(features[0], features[1])
    # handed over in the layout the APM and the decoder read (no NCHW -> NHWC copy after each encode)
    assert features.shape == (2, 256, 64, 64) and features.is_contiguous(memory_format=torch.channels_last)
    assert all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in taps)


def test_the_cache_entry_is_written_once_read_back_and_rebuilt_when_damaged(make_backbone, tiny_sam, caplog):
    first = make_backbone(tiny_sam)
    engine = InferenceEngine(first, "cpu", runtime="openvino")
    assert engine.prepare_runtime() > 0  # converted now
    folder = first.openvino_encoders[("fp32", engine.threads)].folder
    assert sorted(p.name for p in folder.iterdir()) == ["encoder.bin", "encoder.xml", "manifest.json"]
    expected = engine.encode(_images(1))[0].features
    again = InferenceEngine(make_backbone(tiny_sam), "cpu", runtime="openvino")
    assert again.prepare_runtime() is None  # read from the cache, not converted
    weights = folder / "encoder.bin"
    damaged = bytearray(weights.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    rebuilt = InferenceEngine(make_backbone(tiny_sam), "cpu", runtime="openvino")
    with caplog.at_level(logging.WARNING):
        assert rebuilt.prepare_runtime() > 0
    assert "damaged" in caplog.text
    assert torch.allclose(rebuilt.encode(_images(1))[0].features, expected, atol=1e-5)


SIGNAL_AFTER_FREE = """
import gc, os, signal, threading, time
import numpy as np
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.inference.engine import InferenceEngine
backbone = load_backbone("tiny_random")
InferenceEngine(backbone, "cpu", runtime="openvino").encode([np.zeros((40, 30, 3), np.uint8)])
held = [backbone.openvino_encoders.popitem()]
thread = threading.Thread(target=lambda: (held.clear(), gc.collect()))  # the model freed on another thread
thread.start()
thread.join()
try:
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl+C on the thread that ran the model
    time.sleep(5)
except KeyboardInterrupt:
    print("interrupted cleanly")
"""


def test_ctrl_c_after_the_openvino_model_is_freed_elsewhere_interrupts_cleanly(tmp_path):
    """OpenVINO's CPU plugin leaves its freed signal stack registered on the thread that ran a model; a
    later Ctrl+C there was a SIGSEGV (exit 139) instead of a KeyboardInterrupt (``signal_stack``)."""
    env = dict(os.environ, PROMISE_SEGMENT_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(LIB))
    run = subprocess.run(
        [sys.executable, "-c", SIGNAL_AFTER_FREE], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "interrupted cleanly" in run.stdout, run.stderr[-2000:]


def test_lite_medsams_stage_0_is_a_model_of_its_own_compiled_in_f32_under_bf16(lite_medsam):
    """With one bf16 model a trained adapter's automatic masks agreed with fp32 at 0.987 (PyTorch, stage 0 in
    fp32: 0.993); OpenVINO ignores ``disable_fp16_compression`` marks under a bf16 hint, so stage 0 is its own
    model, compiled in f32 whatever the engine's precision, and the rest in the engine's."""
    encoder = openvino_runtime.OpenVinoEncoder(lite_medsam, "bf16", 2)
    assert encoder.parts == ("head", "encoder")
    assert encoder.hints == {"head": "f32", "encoder": "bf16"}
    head, rest = encoder._compiled_models()
    assert head.get_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
    # static shapes, planned once: one 256x256 image, then exactly what the head gives (get_shape raises if dynamic)
    assert list(head.inputs[0].get_shape()) == [1, 3, 256, 256]
    assert list(rest.inputs[0].get_shape()) == list(head.outputs[0].get_shape())
    assert sorted(p.name for p in encoder.folder.iterdir()) == [
        "encoder.bin",
        "encoder.xml",
        "head.bin",
        "head.xml",
        "manifest.json",
    ]
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = lite_medsam.spec.encode_head(lite_medsam.sam, x)
    assert torch.allclose(torch.from_numpy(np.array(head(x.numpy())[0])), expected, atol=1e-4)  # f32, not bf16
    assert openvino_runtime.OpenVinoEncoder(lite_medsam, "fp32", 2).hints == {"head": "f32", "encoder": "f32"}


def test_training_on_cached_features_frees_the_compiled_encoder_and_encoding_still_works(make_backbone, tiny_sam):
    """Every epoch reads the feature store, so the compiled encoder's activation buffers (a few hundred MB
    for LiteMedSAM) are freed after the encode phase, where the joint phase's peak would add to them."""
    from PromiseSegmentLib.data.datasets import Case
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.trainer import train_adapter

    engine = InferenceEngine(make_backbone(tiny_sam), "cpu", runtime="openvino")
    rng = np.random.default_rng(1)
    cases = []
    for i in range(4):
        mask = np.zeros((64, 64), bool)
        mask[10 + i : 40, 12 : 44 - i] = True
        cases.append(Case(str(i), rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), mask))
    cfg = TrainConfig(epochs=1, batch_size=2, augment=False, cache_features=True, use_apm=False)
    expected = engine.encode(_images(1))[0].features
    train_adapter(engine, cases[:3], cases[3:], cfg)
    assert engine._openvino is not None and engine._openvino._compiled is None  # freed
    assert torch.allclose(engine.encode(_images(1))[0].features, expected, atol=1e-6)  # compiled again
