"""Speed modes keep the results: load-time rewrites (BatchNorm folding, fused conv/linear+GELU, SDPA) against
the model as built, bf16 masks against fp32 masks on real CT, the fp32 fallback, the batch-size and
out-of-memory rules of the GPU path (run on the CPU), and decoder-only prompts on a cached embedding."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sample_data import make_sample_volume
from torch import nn

from PromiseSegmentLib.backbones import decoder_rewrites as dr
from PromiseSegmentLib.backbones import lite_medsam as lite
from PromiseSegmentLib.backbones import rewrites as rw
from PromiseSegmentLib.backbones.checkpoints import file_sha256
from PromiseSegmentLib.backbones.lite_medsam import CHECKPOINT, _window_attention
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.data.prompts import Prompts, mask_box
from PromiseSegmentLib.evaluation.metrics import dice
from PromiseSegmentLib.inference import acceleration as acc
from PromiseSegmentLib.inference import heap
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache
from PromiseSegmentLib.inference.engine import InferenceEngine
from PromiseSegmentLib.inference.volume_loop import segment_slice

needs_bf16 = pytest.mark.skipif(not acc.cpu_bf16()[0], reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def as_built():
    """LiteMedSAM exactly as the package builds it (no load-time rewrites)."""
    return load_backbone("lite_medsam", optimise=False)


def _run(engine, cases):
    embs = engine.encode([c.rgb for c in cases])
    preds = [engine.predict(e, Prompts(box=mask_box(c.mask)), multimask_output=False) for e, c in zip(embs, cases)]
    return embs, preds


def test_rewrites_keep_fp32_outputs_and_the_file(lite_medsam, as_built, spleen_cases):
    enc = lite_medsam.sam.image_encoder
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())  # folded ...
    assert any(isinstance(m, rw.ConvGelu) for m in enc.modules())  # ... and fused
    windows = [m for m in enc.modules() if hasattr(m, "attention_bias_idxs")]
    assert windows and all(type(m).forward is _window_attention for m in windows)  # ... and attention rewritten
    assert all(type(m).forward is lite._mbconv_in_strips for m in enc.modules() if type(m).__name__.endswith("MBConv"))
    assert any(isinstance(m, nn.BatchNorm2d) for m in as_built.sam.image_encoder.modules())
    assert file_sha256(lite_medsam.path) == CHECKPOINT.sha256  # folding happened in memory only
    cases = spleen_cases[:2]
    fast_embs, fast = _run(InferenceEngine(lite_medsam, "cpu", capture_taps=True), cases)
    ref_embs, ref = _run(InferenceEngine(as_built, "cpu", capture_taps=True), cases)
    for a, b, pa, pb in zip(fast_embs, ref_embs, fast, ref):
        assert (a.features - b.features).abs().max() <= 1e-4
        assert all((ta - tb).abs().max() <= 1e-4 for ta, tb in zip(a.taps, b.taps))
        assert np.abs(pa.low_res - pb.low_res).max() <= 1e-3
        assert (pa.masks != pb.masks).mean() <= 1e-4  # at most a borderline pixel or two


@needs_bf16
def test_bf16_masks_agree_with_fp32_on_real_ct(lite_medsam, spleen_cases):
    cases = spleen_cases[2:4]
    bf16 = InferenceEngine(lite_medsam, "cpu", precision="bf16")
    assert bf16.precision.name == "bf16" and bf16.precision_summary == "cpu bf16"
    embs16, p16 = _run(bf16, cases)
    embs32, p32 = _run(InferenceEngine(lite_medsam, "cpu", precision="fp32"), cases)
    assert embs16[0].features.dtype == torch.float32  # the rest of the library sees fp32 either way
    assert (embs16[0].features - embs32[0].features).abs().max() > 1e-3  # bf16 really ran
    scores = [dice(a.masks[0], b.masks[0]) for a, b in zip(p16, p32)]
    assert np.mean(scores) >= 0.99, scores
    assert all(dice(p.masks[0], c.mask) > 0.5 for p, c in zip(p16, cases))  # still segments the spleen


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_encoder_in_strips_equals_the_whole_image(lite_medsam, precision, monkeypatch):
    """Stage 0's MBConv and the PatchMerging blocks computed in strips of rows (with the depthwise conv's halo,
    stride 1 and 2, a short last strip) give the whole-image result."""
    if precision == "bf16" and not acc.cpu_bf16()[0]:
        pytest.skip("this CPU has no native bf16")  # the fp32 case covers the strips' logic
    dtype = None if precision == "fp32" else torch.bfloat16
    x = torch.rand(2 if dtype is None else 1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    calls = []
    strips = lite._in_strips
    monkeypatch.setattr(lite, "_in_strips", lambda *a: calls.append(strips(*a)) or calls[-1])

    def encode(strip_bytes):
        monkeypatch.setattr(lite, "STRIP_BYTES", strip_bytes)
        calls.clear()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            return lite_medsam.spec.encode(lite_medsam.sam, x, True)

    whole = encode(1 << 40)
    assert calls and all(c is None for c in calls)  # no strips with an unlimited budget
    # 7 rows of stage 0's hidden activation per strip (fp32 in both precisions): 128/7, then 64/11 and 64/22
    # in the later blocks (64/22 and 64/44 in bf16)
    split = encode(7 * 256 * 256 * 4 * x.shape[0])
    assert len(calls) == 5 and all(c is not None for c in calls)
    tol = 1e-5 if dtype is None else 2e-2
    for a, b in zip([split[0], *split[1]], [whole[0], *whole[1]]):
        assert a.shape == b.shape and (a.float() - b.float()).abs().max() <= tol


def test_stage_0_runs_in_fp32_under_bf16_autocast(lite_medsam):
    """The patch embedding and stage 0 (full 256x256 resolution) give their fp32 result under bf16 autocast:
    rounding there is amplified by every later layer (``lite_medsam.FP32_STAGE_0``). Later stages run in bf16."""
    enc = lite_medsam.sam.image_encoder
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=torch.channels_last
    )
    seen = []
    hooks = [
        m.register_forward_hook(lambda m, a, out: seen.append(out)) for m in (enc.layers[0], enc.layers[1].blocks[0])
    ]
    try:
        with torch.no_grad():
            lite_medsam.spec.encode(lite_medsam.sam, x, True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lite_medsam.spec.encode(lite_medsam.sam, x, True)
    finally:
        for h in hooks:
            h.remove()
    (stage0, stage1), (stage0_16, stage1_16) = seen[:2], seen[2:]
    assert stage0_16.dtype == torch.float32 and (stage0_16 - stage0).abs().max() <= 1e-5
    assert stage1_16.dtype == torch.bfloat16 and (stage1_16.float() - stage1).abs().max() > 1e-3


def test_fused_gelu_under_bf16_autocast_falls_back_to_the_plain_ops_without_bf16_kernels(monkeypatch):
    """Where oneDNN has no bf16 kernels (AVX2 CPUs) its fused op refuses bf16 ("could not create a primitive
    descriptor"); the fused module must then run the plain ops, which autocast handles."""
    monkeypatch.setattr(rw, "mkldnn_bf16_native", lambda: False)
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 128)
    x = torch.randn(2, 10, 64, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused, plain = rw.LinearGelu(lin)(x), torch.nn.functional.gelu(lin(x))
    assert fused.dtype == plain.dtype == torch.bfloat16
    assert (fused.float() - plain.float()).abs().max() <= 3e-2


LIB = Path(__file__).resolve().parents[2] / "PromiseSegment"
HEAP_PROBE = """
import resource
import numpy as np
from PromiseSegmentLib.backbones.registry import load_backbone
from PromiseSegmentLib.inference.engine import InferenceEngine
engine = InferenceEngine(load_backbone("lite_medsam"), "cpu")
print(engine.heap)

def slice_like():  # 96 MB of 8 MB activations, freed together: what one slice does to the heap
    blocks = [np.ones(1 << 20) for _ in range(12)]
    del blocks

for _ in range(2):
    slice_like()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    slice_like()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@pytest.mark.skipif(heap._glibc() is None, reason="malloc thresholds are glibc's (Linux)")
def test_encodes_reuse_freed_memory_without_page_faults(tiny_backbone):
    """With the engine's malloc thresholds (heap.py) the memory one slice frees stays with the process and
    the next slice reuses it; with glibc's defaults much of it is given back and faulted in again. Probed with
    a slice's allocation pattern rather than a real encode: how many pages an encode faults with glibc's
    defaults depends on the CPU's kernels (8,700 per fp32 encode on one CI machine, 25,000-133,000 here),
    the thresholds' effect does not. A user's own malloc settings are left alone, and the engine says what
    it runs with."""

    def probe(**env):
        out = (
            subprocess.run(
                [sys.executable, "-c", HEAP_PROBE],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, "PYTHONPATH": str(LIB), **env},
            )
            .stdout.strip()
            .split("\n")
        )
        return out[0], int(out[1])

    said, kept = probe()
    said_default, default = probe(PROMISE_SEGMENT_KEEP_FREED_MEMORY="0")
    assert "keeps up to 128 MB" in said and "defaults" in said_default
    assert default >= 1_000  # at least 4 MB given back and faulted in again per slice
    assert kept <= default / 10
    assert heap._apply({"MALLOC_TRIM_THRESHOLD_": "1"}) == "malloc as set by MALLOC_TRIM_THRESHOLD_"
    assert heap._apply({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}).startswith("malloc as set by")
    engine = InferenceEngine(tiny_backbone, "cpu")
    assert engine.heap == heap.keep_freed_memory() and engine.heap in engine.describe()


def test_fallback_to_fp32_gives_fp32_results(lite_medsam, spleen_cases, monkeypatch):
    monkeypatch.setenv(acc.CPU_BF16_ENV, "0")
    asked = InferenceEngine(lite_medsam, "cpu", precision="bf16")
    assert asked.precision.name == "fp32" and acc.CPU_BF16_ENV in asked.describe()
    image = spleen_cases[0].rgb
    a, b = asked.encode([image])[0], InferenceEngine(lite_medsam, "cpu", precision="fp32").encode([image])[0]
    assert torch.equal(a.features, b.features)


def test_a_shared_cache_keeps_precisions_apart(tiny_backbone, rng, make_image):
    """Slicer shares one embedding cache between engines: a bf16 embedding must not answer an fp32 engine."""

    cache, image = EmbeddingCache(), make_image(rng, 60, 60)
    fp32 = InferenceEngine(tiny_backbone, "cpu", cache=cache, precision="fp32")
    other = InferenceEngine(tiny_backbone, "cpu", cache=cache, precision="bf16")  # asked explicitly: allowed
    a = fp32.encode([image])[0]
    b = other.encode([image])[0]
    same = other.precision.name == "fp32"  # a CPU without bf16: both are fp32 and may share
    assert cache.hits == (1 if same else 0) and (a is b) == same
    assert fp32.encode([image])[0] is a and cache.hits == (2 if same else 1)


def test_precision_rules():
    cpu = torch.device("cpu")
    assert acc.resolve_precision("fp32", cpu, True).name == "fp32"
    assert acc.resolve_precision("fp16", cpu, True).name == "fp32"  # fp16 is not a CPU speed-up
    assert acc.resolve_precision("auto", cpu, False).name == "fp32"  # bf16 agreement not measured
    assert acc.resolve_precision("auto", torch.device("mps"), True).name == "fp32"
    native = acc.cpu_bf16()[0]
    assert acc.resolve_precision("auto", cpu, True).name == ("bf16" if native else "fp32")
    with pytest.raises(ValueError, match="precision must be one of"):
        acc.resolve_precision("int8", cpu, True)


def test_auto_precision_of_the_engine(tiny_backbone, lite_medsam):
    assert InferenceEngine(tiny_backbone, "cpu", precision="auto").precision.name == "fp32"  # not measured for it
    fast = InferenceEngine(lite_medsam, "cpu", precision="auto")
    assert fast.precision.name == ("bf16" if acc.cpu_bf16()[0] else "fp32")
    text = fast.describe()
    assert "lite_medsam on cpu" in text and "BatchNorm folded into 27 convs" in text and "batch 1" in text


def test_batch_sizes_and_out_of_memory_steps():
    assert acc.batch_size_for_memory(80 << 30, 200 << 20) == acc.MAX_BATCH  # an H200 is capped
    assert acc.batch_size_for_memory(4 << 30, 200 << 20) == 10  # half of 4 GiB / 200 MiB
    assert acc.batch_size_for_memory(100 << 20, 1 << 30) == 1  # never below 1
    assert acc.auto_batch_size(torch.device("cpu"), 1) == 1
    steps, size, on_cpu = [], 8, False
    while True:
        try:
            size, on_cpu = acc.after_out_of_memory(size, on_cpu)
        except MemoryError:
            break
        steps.append((size, on_cpu))
    assert steps == [(4, False), (2, False), (1, False), (1, True)]


def test_batch_memory_estimate_follows_the_precision_of_the_peak(lite_medsam, tiny_backbone):
    """GPU batch sizing: LiteMedSAM's peak (stage 0) stays fp32 in bf16 engines; a ViT's halves."""
    assert lite_medsam.spec.encode_bytes(True) == lite_medsam.spec.encode_bytes(False) > 0
    assert tiny_backbone.spec.encode_bytes(True) == tiny_backbone.spec.encode_bytes(False) // 2


def test_a_real_cpu_allocation_failure_counts_as_out_of_memory():
    from PromiseSegmentLib.inference.devices import is_out_of_memory

    with pytest.raises(RuntimeError) as err:
        torch.empty(1 << 60, dtype=torch.uint8)  # refused by the allocator at once, nothing is touched
    assert is_out_of_memory(err.value) and not is_out_of_memory(RuntimeError("size mismatch"))


class MemoryLimitedEngine(InferenceEngine):
    """Simulates a device that holds at most ``limit`` images per encoder batch: a larger batch raises
    PyTorch's own out-of-memory error before any work (the back-off under test is the real one)."""

    limit = 2

    def _encode_batch(self, batch):
        if batch.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"out of memory: {batch.shape[0]} images (simulated limit {self.limit})")
        return super()._encode_batch(batch)


def test_engine_halves_the_batch_on_out_of_memory(tiny_backbone, rng, make_image):

    images = [make_image(rng, 64, 80) for _ in range(3)]
    engine = MemoryLimitedEngine(tiny_backbone, "cpu", batch_size=8)
    got = engine.encode(images)
    assert engine.batch_size == 2
    ref = InferenceEngine(tiny_backbone, "cpu", batch_size=1).encode(images)
    assert all(torch.allclose(a.features, b.features, atol=1e-5) for a, b in zip(got, ref))
    engine.limit = 0  # not even one image fits, and this is already the CPU
    with pytest.raises(MemoryError, match="on the CPU"):
        engine.encode(images[:1])


def test_cpu_clone_does_not_move_or_copy_the_shared_model(tiny_backbone, rng, make_image):

    sam = tiny_backbone.sam
    clone = acc.cpu_clone(sam)
    assert clone is not sam and clone.image_encoder is not sam.image_encoder
    for (name, p), q in zip(sam.named_parameters(), clone.parameters()):
        assert p is not q and p.device.type == "cpu" and p.data_ptr() == q.data_ptr(), name  # shared storage
    x = torch.rand(1, 3, 1024, 1024)
    with torch.no_grad():
        assert torch.equal(clone.image_encoder(x), sam.image_encoder(x))


def test_sam_vit_attention_through_sdpa_keeps_outputs(tiny_sam):
    """SAM ViT-B/L/H get fused attention at load time; checked here on the tiny ViT with its relative
    position tables made non-zero (so the additive mask matters)."""
    import copy

    from PromiseSegmentLib.backbones.sam_vit import sdpa_encoder_attention

    plain = copy.deepcopy(tiny_sam)
    with torch.no_grad():
        for name, p in plain.image_encoder.named_parameters():
            if "rel_pos" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    fast = copy.deepcopy(plain)
    assert sdpa_encoder_attention(fast.image_encoder) == len(fast.image_encoder.blocks)
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = plain.image_encoder(x)
        assert (fast.image_encoder(x) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fold_batchnorm_generic():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    model = nn.Sequential(nn.Sequential(conv, bn), nn.ReLU(), nn.Conv2d(5, 4, 1), nn.BatchNorm2d(4).train())
    model[0].eval()
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        ref = model[0](x)
        assert rw.fold_batchnorm(model) == 1  # the training-mode BatchNorm is left alone
        assert type(model[0]) is nn.Conv2d and isinstance(model[3], nn.BatchNorm2d)
        assert torch.allclose(model[0](x), ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_fused_gelu_equals_the_plain_ops(kind):
    torch.manual_seed(1)
    layer = nn.Conv2d(8, 16, 3, padding=1) if kind == "conv" else nn.Linear(8, 16)
    x = torch.randn(2, 8, 12, 12) if kind == "conv" else torch.randn(2, 30, 8)
    owner = nn.Module()
    owner.layer, owner.act = layer, nn.GELU()
    assert rw.fuse_gelu(owner, "layer", "act") and isinstance(owner.act, nn.Identity)
    with torch.no_grad():
        ref = torch.nn.functional.gelu(layer(x))
        assert torch.allclose(owner.layer(x), ref, atol=1e-5)
        if acc.cpu_bf16()[0]:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.allclose(owner.layer(x).float(), ref, atol=0.05)
    owner.layer(x).sum().backward()  # trainable weights: the plain ops, so gradients exist
    assert layer.weight.grad is not None
    tanh = nn.Module()
    tanh.layer, tanh.act = nn.Linear(8, 16), nn.GELU(approximate="tanh")
    assert not rw.fuse_gelu(tanh, "layer", "act")  # another function: left alone


def test_threads():
    before = torch.get_num_threads()
    try:
        assert acc.configure_threads(1) == 1 == torch.get_num_threads()
        assert acc.configure_threads(None) == 1  # no request: PyTorch's setting stays when it fits
        assert 1 <= acc.available_cpus() <= (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


def test_prompts_on_a_cached_slice_run_the_decoder_only(lite_medsam):
    vol, truth = make_sample_volume(5, shape=(6, 96, 80))
    engine = InferenceEngine(lite_medsam, "cpu", precision="auto", cache=EmbeddingCache())
    calls = []
    hook = engine.sam.image_encoder.patch_embed.register_forward_hook(lambda *a: calls.append(1))  # encoder's entry
    try:
        k = int(np.argmax(truth.reshape(truth.shape[0], -1).sum(1)))
        box = mask_box(truth[k])
        for margin in (0, 2, 4):  # three clicks/boxes on the same slice
            grown = box + np.array([-margin, -margin, margin, margin])
            pred = segment_slice(engine, vol.array, vol.ijk_to_ras, "K", k, Prompts(box=grown))
            assert pred.masks.shape[1:] == truth[k].shape
    finally:
        hook.remove()
    assert len(calls) == 1 and engine.cache.hits == 2


@needs_bf16
def test_promise_decodes_in_the_engine_precision_with_fp32_prompts(lite_medsam, spleen_cases):
    """The automatic path's decoder runs in bf16; the APM's box (the prompt) stays exactly the fp32 one."""
    from PromiseSegmentLib.model.promise import ProMISeModel
    from PromiseSegmentLib.training.config import TrainConfig
    from PromiseSegmentLib.training.setup import build_adapter

    adapter = build_adapter(TrainConfig(apm_fusion_dim=32, apm_tap_pool=2), lite_medsam)
    with torch.no_grad():  # a non-zero IPS shift, so the shifted decode is what is compared
        for p in adapter.ips.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fp32 = ProMISeModel(InferenceEngine(lite_medsam, "cpu", precision="fp32", capture_taps=True), adapter)
    bf16 = ProMISeModel(InferenceEngine(lite_medsam, "cpu", precision="bf16", capture_taps=True), adapter)
    scores = []
    for case in spleen_cases[:2]:
        emb = fp32.engine.encode([case.rgb])[0]  # one embedding: only the decoder's precision differs
        auto16, auto32 = bf16.predict(emb, mode="apm+ips"), fp32.predict(emb, mode="apm+ips")
        np.testing.assert_array_equal(auto16.box, auto32.box)
        box = Prompts(box=mask_box(case.mask))
        a, b = bf16.predict(emb, box, mode="ips"), fp32.predict(emb, box, mode="ips")
        assert a.low_res.dtype == np.float32 and np.abs(a.low_res - b.low_res).max() > 1e-3  # bf16 really ran
        scores.append(dice(a.masks[0], b.masks[0]))
    assert np.mean(scores) >= 0.99, scores


@needs_bf16
def test_bf16_engines_share_one_half_precision_decoder_copy(lite_medsam, spleen_cases):
    case = spleen_cases[0]
    a, b = InferenceEngine(lite_medsam, "cpu", precision="bf16"), InferenceEngine(lite_medsam, "cpu", precision="bf16")
    emb = a.encode([case.rgb])[0]
    pa, pb = (e.predict(emb, Prompts(box=mask_box(case.mask)), multimask_output=False) for e in (a, b))
    np.testing.assert_array_equal(pa.low_res, pb.low_res)
    copies = [h for (dtype, _), h in lite_medsam.half_decoders.items() if dtype == torch.bfloat16]
    assert len(copies) == 1 and all(p.dtype == torch.bfloat16 for p in copies[0].decoder.parameters())
    assert copies[0].image_pe.is_contiguous(memory_format=torch.channels_last)  # the image tokens' layout (NHWC)
    assert all(p.dtype == torch.float32 for p in lite_medsam.sam.mask_decoder.parameters())  # the model is untouched
    fp32 = InferenceEngine(lite_medsam, "cpu", precision="fp32").predict(
        emb, Prompts(box=mask_box(case.mask)), multimask_output=False
    )
    assert pa.low_res.dtype == np.float32 and np.abs(pa.low_res - fp32.low_res).max() > 1e-3
    assert dice(pa.masks[0], fp32.masks[0]) >= 0.99


def test_decoder_upscaling_as_matrix_products_equals_the_transposed_convolutions(lite_medsam, as_built):
    """The 4x upscaling of LiteMedSAM's decoder runs as two matrix products (``dr._upscaling_as_matmuls``):
    same values and gradients as the as-built Sequential for NCHW and channels_last input."""
    fast, ref = lite_medsam.sam.mask_decoder.output_upscaling, as_built.sam.mask_decoder.output_upscaling
    assert type(fast).forward is dr._upscaling_as_matmuls and type(ref).forward is nn.Sequential.forward
    assert fast.state_dict().keys() == ref.state_dict().keys()  # a saved adapter/backbone still loads
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 256, 16, 16, generator=g)
    for layout in (torch.contiguous_format, torch.channels_last):
        xf = x.clone(memory_format=layout).requires_grad_(True)
        xr = x.clone().requires_grad_(True)
        yf, yr = fast(xf), ref(xr)
        assert yf.shape == yr.shape == (2, 32, 64, 64)
        assert (yf - yr).abs().max() <= 1e-5
        weight = torch.randn(yr.shape, generator=g)
        (yf * weight).sum().backward()
        (yr * weight).sum().backward()
        assert (xf.grad - xr.grad).abs().max() <= 1e-4 * xr.grad.abs().max()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        yb, yr = fast(x), ref(x).float()
    assert yb.dtype == torch.bfloat16 and (yb.float() - yr).abs().max() <= 0.1  # bf16 rounding only


def test_decoder_upscaling_rewrite_only_takes_sams_layout():
    from segment_anything.modeling.common import LayerNorm2d

    def sam_layout(kernel=2, act=nn.GELU):
        up1, up2 = nn.ConvTranspose2d(8, 4, kernel, stride=2), nn.ConvTranspose2d(4, 2, 2, stride=2)
        return nn.Sequential(up1, LayerNorm2d(4), act(), up2, act())

    assert dr._upscaling_fits(sam_layout())
    assert not dr._upscaling_fits(sam_layout(kernel=3))  # overlapping kernels: not one product per pixel
    assert not dr._upscaling_fits(sam_layout(act=nn.ReLU))
    assert not dr._upscaling_fits(nn.Sequential(*list(sam_layout().children())[:4]))


@pytest.mark.parametrize(
    "queries, keys, path",
    [
        (7, 4096, "_few_queries"),
        (4096, 7, "_few_keys"),
        (7, 7, "_sdpa_attention_forward"),
        (20, 4096, "_sdpa_attention_forward"),
    ],
)
def test_decoder_attention_folded_where_one_side_is_small(lite_medsam, as_built, monkeypatch, queries, keys, path):
    """The decoder's cross-attention between a few prompt tokens and the 4096 image tokens folds the image
    side's projections into the tokens' side (``dr._few_queries`` / ``dr._few_keys``); 20 tokens x 8 heads
    are wider than the 128-wide projection, so they stay on SDPA. Same values and gradients as
    segment_anything's ``Attention.forward`` in fp32 (batch 2, as in training); bf16 as close as SDPA's."""
    from segment_anything.modeling.transformer import Attention

    fast = [m for m in lite_medsam.sam.mask_decoder.modules() if isinstance(m, Attention)]
    assert fast and all(type(m).forward is dr._attention_forward for m in fast)
    layer = as_built.sam.mask_decoder.transformer.layers[0].cross_attn_token_to_image  # internal width 128
    taken = []
    monkeypatch.setattr(dr, path, lambda *a, f=getattr(dr, path): taken.append(path) or f(*a))
    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, queries, 256, generator=g), torch.randn(2, keys, 256, generator=g)
    v = torch.randn(2, keys, 256, generator=g)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref, out = Attention.forward(layer, q, k, v), dr._attention_forward(layer, *inputs)
    assert taken == [path]
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    weight = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((out * weight).sum(), inputs)
    plain = [t.clone().requires_grad_(True) for t in (q, k, v)]
    for a, b in zip(grads, torch.autograd.grad((Attention.forward(layer, *plain) * weight).sum(), plain)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    half = copy.deepcopy(layer).to(torch.bfloat16)
    with torch.no_grad():
        bf = [t.to(torch.bfloat16) for t in (q, k, v)]
        err_fast = (dr._attention_forward(half, *bf).float() - ref).abs().max()
        err_sdpa = (dr._sdpa_attention_forward(half, *bf).float() - ref).abs().max()
    assert err_fast <= 2 * err_sdpa + 1e-3


def test_mask_products_on_pixel_rows_equal_the_upscaled_image(lite_medsam, as_built):
    """``dr.upscaled_masks`` takes the hypernetwork products on the upscaling's pixel rows and puts only the
    T-channel result in place: equal to ``hyper_in @ output_upscaling(src)`` as segment_anything computes it."""
    g = torch.Generator().manual_seed(7)
    src = torch.randn(2, 256, 64, 64, generator=g).to(memory_format=torch.channels_last)
    hyper_in = torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        up = as_built.sam.mask_decoder.output_upscaling(src.contiguous())
        ref = (hyper_in @ up.view(2, 32, -1)).view(2, 4, 256, 256)
        fast = dr.upscaled_masks(lite_medsam.sam.mask_decoder.output_upscaling, src, hyper_in)
        generic = dr.upscaled_masks(as_built.sam.mask_decoder.output_upscaling, src.contiguous(), hyper_in)
    assert fast.shape == ref.shape and (fast - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(generic, ref)
