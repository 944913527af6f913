"""Checkpoint download/verify/load failures, served from a local HTTP server on 127.0.0.1."""
import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest
import torch

from PromiseSegmentLib import checkpoints
from PromiseSegmentLib.checkpoints import (CheckpointError, CheckpointInfo, cache_dir, download_file, ensure_checkpoint,
                                           load_backbone, load_sam, load_state_dict)
from PromiseSegmentLib.sam_models import build_seeded_sam


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
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


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
    dest = download_file(server + "/ok.pth", tmp_path / "c" / "ok.pth", _sha(tiny_file), lambda d, t: seen.append((d, t)))
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
    from PromiseSegmentLib.engine import Cancelled

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
    registry = {"tiny": CheckpointInfo("tiny", "tiny", "reg.pth", server + "/reg.pth", _sha(tiny_file), "test")}
    path = ensure_checkpoint("tiny", registry=registry)
    assert path.parent == cache_dir() and path.name == "reg.pth"
    del _Handler.files["/reg.pth"]  # a second call must not download again
    assert ensure_checkpoint("tiny", registry=registry) == path
    path.write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="does not match the official SHA-256"):
        ensure_checkpoint("tiny", registry=registry)


def test_official_registry_has_the_design_hashes():
    reg = checkpoints.REGISTRY
    assert reg["vit_b"].sha256.startswith("ec2df627") and reg["vit_b"].url.endswith("sam_vit_b_01ec64.pth")
    assert reg["vit_l"].sha256.startswith("3adcc431") and reg["vit_h"].sha256.startswith("a7bf3b02")
    assert reg["medsam"].url is None and reg["medsam"].variant == "vit_b"


def test_load_round_trip_and_identity(tiny_file):
    sam, variant, sha = load_sam(str(tiny_file))
    assert variant == "tiny" and sha == _sha(tiny_file)
    ref = build_seeded_sam("tiny", 5).state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in sam.state_dict().items())


def test_wrong_variant_is_refused(tiny_file):
    with pytest.raises(CheckpointError, match=r"tiny\.pth is a SAM tiny checkpoint but vit_b was expected"):
        load_state_dict(tiny_file, "vit_b")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_sam"])
def test_corrupt_files_name_the_file(tiny_file, tmp_path, damage):
    bad = tmp_path / f"{damage}.pth"
    if damage == "truncate":
        bad.write_bytes(tiny_file.read_bytes()[: tiny_file.stat().st_size // 3])
    elif damage == "garbage":
        bad.write_bytes(os.urandom(4096))
    else:
        torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(CheckpointError, match=str(bad.name)):
        load_sam(str(bad))


def test_wrapped_training_checkpoint_is_unwrapped(tmp_path):
    path = tmp_path / "medsam_like.pth"
    torch.save({"model": build_seeded_sam("tiny", 5).state_dict(), "epoch": 3}, path)
    _, variant, _ = load_sam(str(path))
    assert variant == "tiny"


def test_pickled_code_is_never_executed(tmp_path):
    path = tmp_path / "evil.pth"

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_sam(str(path))
    assert not (tmp_path / "pwned").exists()


def test_unknown_name_and_default_backbone():
    with pytest.raises(CheckpointError, match="neither a file nor one of"):
        load_backbone("vit_x")
    sam, variant, identity = load_backbone()
    assert variant == "tiny" and identity.startswith("seed:")
    sam2, _, _ = load_backbone("default")
    assert all(torch.equal(v, sam2.state_dict()[k]) for k, v in sam.state_dict().items())
    with pytest.raises(CheckpointError, match="not vit_b"):
        load_backbone("default", "vit_b")


def test_default_backbone_gain_scales_logits_but_changes_no_mask(rng):
    """The calibration multiplies mask logits by exactly DEFAULT_DECODER_GAIN: masks (logit > 0) and the
    IoU head are those of the plain seeded model; only what training sees is rescaled."""
    import numpy as np
    from conftest import realistic_image

    from PromiseSegmentLib.engine import Prompts, SamEngine
    from PromiseSegmentLib.sam_models import (DEFAULT_BACKBONE_SEED, DEFAULT_DECODER_GAIN, build_default_backbone,
                                              build_seeded_sam)

    plain = SamEngine(build_seeded_sam("tiny", DEFAULT_BACKBONE_SEED), "cpu")
    calibrated = SamEngine(build_default_backbone(), "cpu")
    realistic = realistic_image(rng, 120, 100)
    prompts = Prompts(points=[[55, 54], [10, 10]], labels=[1, 0])
    a = plain.predict(plain.encode([realistic])[0], prompts)
    b = calibrated.predict(calibrated.encode([realistic])[0], prompts)
    assert np.array_equal(a.masks, b.masks) and np.allclose(a.iou, b.iou)
    assert np.allclose(b.low_res, DEFAULT_DECODER_GAIN * a.low_res, rtol=1e-4, atol=1e-4)
    assert np.abs(a.low_res).max() < 1.0  # why: uncalibrated random heads sit at the threshold
