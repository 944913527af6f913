"""Checkpoint download/verify/load failures, served from a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import os
from pathlib import Path

import pytest
import torch
from local_http import serve

from PromiseSegmentLib.backbones.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    cache_dir,
    download_file,
    ensure_checkpoint,
)
from PromiseSegmentLib.backbones.registry import BACKBONES, load_backbone, user_backbones
from PromiseSegmentLib.backbones.sam_vit import build_seeded_sam
from PromiseSegmentLib.names import BOX_ONLY_BACKBONES, DEFAULT_BACKBONE, DEVICES, MODES, USER_BACKBONES


def load_sam(spec):
    return load_backbone(spec)


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}

    def do_GET(self):
        body, mode = self.files.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "interrupt":  # promise the whole file, send half, hang up
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with serve(_Handler) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save(build_seeded_sam("tiny", 5).state_dict(), path)
    return path


def _no_partial_files(folder: Path):
    return [p.name for p in folder.iterdir()] if folder.exists() else []


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_download_verifies_and_moves_into_place(server, tiny_file, tmp_path):
    _Handler.files["/ok.pth"] = (tiny_file.read_bytes(), None)
    seen = []
    dest = download_file(
        server + "/ok.pth", tmp_path / "c" / "ok.pth", _sha(tiny_file), lambda d, t: seen.append((d, t))
    )
    assert _sha(dest) == _sha(tiny_file) and seen[-1][0] == seen[-1][1] == tiny_file.stat().st_size
    assert _no_partial_files(tmp_path / "c") == ["ok.pth"]


def test_checksum_mismatch_leaves_nothing(server, tiny_file, tmp_path):
    _Handler.files["/bad.pth"] = (tiny_file.read_bytes(), None)
    with pytest.raises(CheckpointError, match="Checksum mismatch.*expected SHA-256 0000"):
        download_file(server + "/bad.pth", tmp_path / "c" / "bad.pth", "0" * 64)
    assert _no_partial_files(tmp_path / "c") == []


def test_interrupted_download_leaves_nothing(server, tiny_file, tmp_path):
    _Handler.files["/cut.pth"] = (tiny_file.read_bytes(), "interrupt")
    with pytest.raises(CheckpointError, match="interrupted"):
        download_file(server + "/cut.pth", tmp_path / "c" / "cut.pth", _sha(tiny_file))
    assert _no_partial_files(tmp_path / "c") == []


def test_cancelled_download_leaves_nothing(server, tiny_file, tmp_path):
    from PromiseSegmentLib.errors import Cancelled

    _Handler.files["/big.pth"] = (tiny_file.read_bytes(), None)
    with pytest.raises(Cancelled):
        download_file(server + "/big.pth", tmp_path / "c" / "big.pth", _sha(tiny_file), cancel=lambda: True)
    assert _no_partial_files(tmp_path / "c") == []


def test_no_network_gives_a_clear_error(tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused, like an offline machine
    with pytest.raises(CheckpointError, match="Could not download .*download the file by hand"):
        download_file(f"http://127.0.0.1:{port}/x.pth", tmp_path / "c" / "x.pth", None, timeout=5)
    assert _no_partial_files(tmp_path / "c") == []


def test_ensure_checkpoint_downloads_once_into_the_user_cache(server, tiny_file):
    _Handler.files["/reg.pth"] = (tiny_file.read_bytes(), None)
    info = CheckpointInfo("reg.pth", server + "/reg.pth", _sha(tiny_file), tiny_file.stat().st_size)
    path = ensure_checkpoint(info)
    assert path.parent == cache_dir() and path.name == "reg.pth"
    del _Handler.files["/reg.pth"]  # a second call must not download again
    assert ensure_checkpoint(info) == path
    path.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="has 8 bytes, expected"):
        ensure_checkpoint(info)
    path.write_bytes(tiny_file.read_bytes()[:-1] + b"x")  # right size, wrong content
    with pytest.raises(CheckpointError, match="does not match the official SHA-256"):
        ensure_checkpoint(info)


def test_registry_has_the_design_hashes_and_the_default():
    assert BACKBONES["sam_vit_b"].checkpoint.sha256.startswith("ec2df627")
    assert BACKBONES["sam_vit_b"].checkpoint.url.endswith("sam_vit_b_01ec64.pth")
    assert BACKBONES["sam_vit_l"].checkpoint.sha256.startswith("3adcc431")
    assert BACKBONES["sam_vit_h"].checkpoint.sha256.startswith("a7bf3b02")
    assert BACKBONES["medsam"].checkpoint.url is None and BACKBONES["medsam"].variant == "vit_b"
    lite = BACKBONES["lite_medsam"].checkpoint
    assert lite.sha256.startswith("79d8c9dc") and lite.size == 39_370_479
    # the torch-free names the CLI and Slicer lists use are the registries themselves
    assert tuple(user_backbones()) == USER_BACKBONES and DEFAULT_BACKBONE == USER_BACKBONES[0] == "lite_medsam"
    assert "tiny_random" in BACKBONES and "tiny_random" not in USER_BACKBONES  # a test fixture, never offered
    from PromiseSegmentLib.names import BACKBONE_KINDS

    assert BACKBONE_KINDS == {n: (b.family, tuple(b.tap_channels)) for n, b in BACKBONES.items()}
    assert BOX_ONLY_BACKBONES == tuple(n for n, b in BACKBONES.items() if b.box_only)
    from types import SimpleNamespace

    from PromiseSegmentLib.inference.devices import pick_device
    from PromiseSegmentLib.modes import resolve_mode

    with_apm = SimpleNamespace(apm=object(), training={})
    assert [resolve_mode(m, with_apm, False, True) for m in MODES] == ["ips", "apm+ips", "ips", "apm+clicks", "vanilla"]
    for name in DEVICES[1:]:  # every listed device is one pick_device understands (available here or not)
        try:
            pick_device(name)
        except ValueError as exc:
            assert "available" in str(exc), name


def test_load_round_trip_and_identity(tiny_file):
    loaded = load_sam(str(tiny_file))
    assert loaded.name == "tiny_random" and loaded.identity == _sha(tiny_file) and not loaded.sam.training
    ref = build_seeded_sam("tiny", 5).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in loaded.sam.state_dict().items())


def test_an_adapters_backbone_is_checked_against_the_file(tiny_file):
    with pytest.raises(CheckpointError, match=r"needs backbone lite_medsam but .*tiny\.pth is tiny_random"):
        load_backbone(str(tiny_file), "lite_medsam")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_sam"])
def test_corrupt_files_name_the_file(tiny_file, tmp_path, damage):
    bad = tmp_path / f"{damage}.pth"
    if damage == "truncate":
        bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 3])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match=str(bad.name) if damage != "not_sam" else "match no known backbone"):
        load_sam(str(bad))


def test_wrapped_training_checkpoint_is_unwrapped(tmp_path):
    path = tmp_path / "medsam_like.pth"
    torch.save({"model": build_seeded_sam("tiny", 5).state_dict(), "epoch": 3}, path)
    assert load_sam(str(path)).name == "tiny_random"


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_sam(str(path))
    assert not (tmp_path / "pwned").exists()


def test_unknown_name_and_the_default_backbone():
    with pytest.raises(CheckpointError, match="neither a file nor one of"):
        load_backbone("vit_x")
    loaded = load_backbone()
    assert loaded.name == "lite_medsam" and loaded.identity == BACKBONES["lite_medsam"].checkpoint.sha256
    assert not loaded.sam.training and not any(p.requires_grad for p in loaded.sam.parameters())


def test_tiny_fixture_gain_scales_logits_but_changes_no_mask(rng, make_backbone, make_image):
    """The test fixture's calibration multiplies mask logits by exactly TINY_DECODER_GAIN: masks (logit > 0)
    and the IoU head are those of the plain seeded model; only what training sees is rescaled."""
    import numpy as np

    from PromiseSegmentLib.backbones.sam_vit import TINY_DECODER_GAIN, TINY_SEED
    from PromiseSegmentLib.data.prompts import Prompts
    from PromiseSegmentLib.inference.engine import InferenceEngine

    plain = InferenceEngine(make_backbone(build_seeded_sam("tiny", TINY_SEED)), "cpu")
    calibrated = InferenceEngine(BACKBONES["tiny_random"].load(), "cpu")
    realistic = make_image(rng, 120, 100)
    prompts = Prompts(points=[[55, 54], [10, 10]], labels=[1, 0])
    a = plain.predict(plain.encode([realistic])[0], prompts)
    b = calibrated.predict(calibrated.encode([realistic])[0], prompts)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.iou, b.iou)
    assert np.allclose(b.low_res, TINY_DECODER_GAIN * a.low_res, rtol=1e-4, atol=1e-4)
    assert np.abs(a.low_res).max() < 1.0  # why: uncalibrated random heads sit at the threshold
