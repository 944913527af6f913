"""SAM checkpoint registry, verified download into a per-user cache, and safe loading.

Downloads stream into a temporary file next to the destination, are hashed on the fly and only
moved into place (atomically) once the SHA-256 matches, so the cache never holds a partial file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch

from .engine import Cancelled
from .paths import CACHE_ENV, cache_dir, write_atomically  # noqa: F401  (CACHE_ENV re-exported)
from .sam_models import build_sam, detect_variant

BASE_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

ProgressFn = Callable[[int, Optional[int]], None]  # (bytes done, bytes total or None)


class CheckpointError(RuntimeError):
    """A checkpoint could not be found, downloaded, verified or loaded. The message says how to fix it."""


@dataclass(frozen=True)
class CheckpointInfo:
    name: str
    variant: str
    filename: str
    url: Optional[str]  # None: user-supplied (no public download)
    sha256: Optional[str]
    description: str


REGISTRY: Dict[str, CheckpointInfo] = {
    "vit_b": CheckpointInfo("vit_b", "vit_b", "sam_vit_b_01ec64.pth", BASE_URL + "sam_vit_b_01ec64.pth",
                            "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
                            "SAM ViT-B (375 MB), the ProMISe default"),
    "vit_l": CheckpointInfo("vit_l", "vit_l", "sam_vit_l_0b3195.pth", BASE_URL + "sam_vit_l_0b3195.pth",
                            "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
                            "SAM ViT-L (1.2 GB)"),
    "vit_h": CheckpointInfo("vit_h", "vit_h", "sam_vit_h_4b8939.pth", BASE_URL + "sam_vit_h_4b8939.pth",
                            "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
                            "SAM ViT-H (2.5 GB)"),
    "medsam": CheckpointInfo("medsam", "vit_b", "medsam_vit_b.pth", None, None,
                             "MedSAM (ViT-B layout); user-supplied, put the file in the cache or pass its path"),
}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a checkpoint, memoised in the cache by (path, size, mtime) to avoid rehashing GBs."""
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    index_path = cache_dir() / "known_hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = sha256_file(path)
        try:
            index_path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_text(index_path, json.dumps(index, indent=1))
        except OSError:
            pass  # memoisation is an optimisation; a read-only cache must not break loading
    return index[key]


def _atomic_write_text(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def _remove_quietly(path) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def download_file(url: str, dest: Path, sha256: Optional[str], progress: Optional[ProgressFn] = None,
                  timeout: float = 60.0, cancel: Optional[Callable[[], bool]] = None) -> Path:
    """Stream ``url`` to ``dest`` verifying ``sha256``; nothing is left at ``dest`` unless it verified.
    ``cancel()`` is polled between blocks (raises ``Cancelled``, the partial file is removed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    h = hashlib.sha256()
    done = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length else None
                    while True:
                        if cancel is not None and cancel():
                            raise Cancelled()
                        block = resp.read(1 << 20)
                        if not block:
                            break
                        out.write(block)
                        h.update(block)
                        done += len(block)
                        if progress:
                            progress(done, total)
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if isinstance(exc, OSError) and exc.errno == 28:
                    raise CheckpointError(f"Disk full while downloading {url} to {dest.parent}: free space "
                                          f"or set {CACHE_ENV} to a folder on a larger disk.") from exc
                raise CheckpointError(
                    f"Could not download {url} ({exc}). Check the network, or download the file by hand and "
                    f"pass its path (or put it in {dest.parent}).") from exc
            except Cancelled:
                raise
            except Exception as exc:  # http.client.IncompleteRead and friends: the connection dropped
                raise CheckpointError(f"Download of {url} was interrupted after {done} bytes ({exc!r}); "
                                      f"run the command again.") from exc
        if total is not None and done != total:
            raise CheckpointError(f"Download of {url} was interrupted: got {done} of {total} bytes; run it again.")
        digest = h.hexdigest()
        if sha256 and digest != sha256:
            raise CheckpointError(f"Checksum mismatch for {url}: expected SHA-256 {sha256}, got {digest}. "
                                  f"The file was discarded; run the command again or download it by hand.")
        os.replace(tmp, dest)
    except BaseException:
        _remove_quietly(tmp)
        raise
    return dest


def ensure_checkpoint(name: str, progress: Optional[ProgressFn] = None,
                      registry: Optional[Dict[str, CheckpointInfo]] = None,
                      cancel: Optional[Callable[[], bool]] = None) -> Path:
    """Path of a registered checkpoint in the cache, downloading and verifying it on first use."""
    registry = registry or REGISTRY
    if name not in registry:
        raise CheckpointError(f"Unknown checkpoint {name!r}; known: {', '.join(sorted(registry))}, "
                              f"or pass the path of a .pth file.")
    info = registry[name]
    dest = cache_dir() / info.filename
    if dest.exists():
        if info.sha256 and file_sha256(dest) != info.sha256:
            raise CheckpointError(f"{dest} does not match the official SHA-256 of {info.filename} "
                                  f"({info.sha256}); delete it and run again to re-download.")
        return dest
    if info.url is None:
        raise CheckpointError(f"{info.description}. Expected it at {dest}.")
    return download_file(info.url, dest, info.sha256, progress, cancel=cancel)


def resolve_checkpoint(spec: str, progress: Optional[ProgressFn] = None,
                       cancel: Optional[Callable[[], bool]] = None) -> Tuple[Path, Optional[str]]:
    """A registry name or a file path -> (local path, variant expected from the name or None)."""
    if spec in REGISTRY:
        return ensure_checkpoint(spec, progress, cancel=cancel), REGISTRY[spec].variant
    path = Path(spec).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {spec!r} is neither a file nor one of: {', '.join(sorted(REGISTRY))}.")
    return path, None


def load_state_dict(path: Path, expected_variant: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str]:
    """Load a SAM state dict without unpickling code; return it with its detected variant."""
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:160]
        raise CheckpointError(f"{path} is not a readable PyTorch weights file (truncated, corrupt, or holding "
                              f"pickled objects, which are never loaded): {type(exc).__name__}: {first_line}. "
                              f"Re-download it or pick the right file.") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):  # training checkpoints (e.g. MedSAM's) wrap the weights
            if key in obj and isinstance(obj[key], dict) and "image_encoder.pos_embed" not in obj:
                obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a SAM state dict.")
    try:
        variant = detect_variant(obj)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}.") from exc
    if expected_variant and variant != expected_variant:
        raise CheckpointError(f"{path} is a SAM {variant} checkpoint but {expected_variant} was expected; "
                              f"pass --variant {variant} or choose the right file.")
    return obj, variant


def load_sam(spec: str, expected_variant: Optional[str] = None, progress: Optional[ProgressFn] = None):
    """Build and load a SAM from a registry name or path. Returns (sam, variant, sha256)."""
    path, registered_variant = resolve_checkpoint(spec, progress)
    state, variant = load_state_dict(path, expected_variant or registered_variant)
    sam = build_sam(variant)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path} does not fit the SAM {variant} architecture: {exc}") from exc
    return sam.eval(), variant, file_sha256(path)


DEFAULT_BACKBONE = "default"


def load_backbone(spec: Optional[str] = None, expected_variant: Optional[str] = None,
                  progress: Optional[ProgressFn] = None):
    """``"default"``/None -> the embedded seeded tiny backbone (not SAM); else as ``load_sam``.

    Returns (sam, variant, identity) where identity is the checkpoint SHA-256 (or the seed tag
    of the embedded backbone), which adapters record to refuse a mismatched backbone later.
    """
    from .sam_models import DEFAULT_BACKBONE_IDENTITY, build_default_backbone

    if spec in (None, "", DEFAULT_BACKBONE):
        if expected_variant not in (None, "tiny"):
            raise CheckpointError(f"the embedded default backbone is 'tiny', not {expected_variant}; "
                                  f"pass --sam-checkpoint with a {expected_variant} file")
        return build_default_backbone(), "tiny", DEFAULT_BACKBONE_IDENTITY
    return load_sam(spec, expected_variant, progress)
