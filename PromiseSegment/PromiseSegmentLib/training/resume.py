"""Resuming an interrupted training run: what its state file holds, and the checks that it belongs to the
same options, backbone and data (torch only to read the file; no backbone needed)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.errors import InputError
from PromiseSegmentLib.training.config import OPTION_NAMES, TrainConfig

STATE_KEYS = (
    "modules",
    "optim",
    "generator",
    "history",
    "best",
    "epoch",
    "best_modules",
    "config",
    "cases",
    "backbone",
    "data",
    "planned_epochs",
)
RESUMABLE_CHANGES = ("epochs",)  # options that may differ between an interrupted run and its resumption


def case_digests(cases: Sequence[Case]) -> List[str]:
    """SHA-256 of each case's name, image and mask (shapes, types, pixels as decoded), in order: how a resumed
    run knows its data are the interrupted run's (the same number of other cases would pass a count)."""
    digests = []
    for c in cases:
        rgb, mask = np.ascontiguousarray(c.rgb), np.ascontiguousarray(c.mask)
        h = hashlib.sha256(json.dumps([c.id, rgb.shape, rgb.dtype.str, mask.shape, mask.dtype.str]).encode())
        h.update(rgb.data)
        h.update(mask.data)
        digests.append(h.hexdigest())
    return digests


def data_fingerprint(train: Sequence[Case], val: Sequence[Case]) -> Dict[str, List[str]]:
    return {"train": case_digests(train), "val": case_digests(val)}


def resume_config(cfg: TrainConfig) -> Dict:
    """The options a resumed run must share with the interrupted one (plain lists, comparable after saving)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}


def read_resume_state(path: Path, cfg: Optional[TrainConfig], cases: Optional[Sequence] = None) -> Dict:
    """An interrupted run's state; ``InputError`` if it is damaged, was written (given ``cfg``) with other
    options or for more epochs than ``cfg`` has, or (``cases``: the training and validation cases, or only
    their counts) for other data; the message says what differs. Needs no backbone: the command line calls it
    before loading one."""
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(
            f"{path} is damaged (truncated or not a training state: {type(exc).__name__}); delete "
            f"it or start again with --overwrite"
        ) from None
    missing = [k for k in STATE_KEYS if not isinstance(st, dict) or k not in st]
    if missing:
        raise InputError(
            f"{path} is damaged or from an older PromiseSegment (it lacks {', '.join(missing)}); "
            f"start again with --overwrite"
        )
    if not (
        isinstance(st["config"], dict)
        and type(st["epoch"]) is int
        and type(st["planned_epochs"]) is int
        and isinstance(st["cases"], (list, tuple))
    ):
        raise InputError(
            f"{path} is damaged (its options, epoch or case counts are unreadable); start again with --overwrite"
        )
    if cfg is not None:
        check_options(path, st, cfg)
    if cases is not None:
        _check_data(path, st, cases)
    return st


def check_options(path: Path, st: Dict, cfg: TrainConfig) -> None:
    now = resume_config(cfg)
    diffs = [
        f"{OPTION_NAMES.get(k, k)} {st['config'].get(k)!r} then, {now.get(k)!r} now"
        for k in sorted(set(now) | set(st["config"]))
        if st["config"].get(k) != now.get(k)
    ]
    if diffs:
        raise InputError(
            f"{path} was written with other options ({'; '.join(diffs)}): resume with the same "
            f"options, or start again with --overwrite"
        )
    done = st["epoch"] + 1
    if cfg.epochs < done:
        raise InputError(
            f"{path}: the interrupted run has already trained {done} epochs, more than --epochs "
            f"{cfg.epochs}: resume with --epochs {done} or more, or start again with --overwrite"
        )


def _check_data(path: Path, st: Dict, cases: Sequence) -> None:
    """Counts, then (given the cases themselves) each case's digest against the interrupted run's."""
    counts = [c if isinstance(c, int) else len(c) for c in cases]
    if list(st["cases"]) != counts:
        raise InputError(
            f"{path} was written for {st['cases'][0]} training and {st['cases'][1]} validation cases, "
            f"now there are {counts[0]} and {counts[1]}: resume with the same data, or start again "
            f"with --overwrite"
        )
    if isinstance(cases[0], int):
        return
    data = st["data"]
    if not (
        isinstance(data, dict)
        and all(isinstance(data.get(k), list) for k in ("train", "val"))
        and [len(data["train"]), len(data["val"])] == counts
    ):
        raise InputError(f"{path} is damaged (its data fingerprint is unreadable); start again with --overwrite")
    for what, key, now in (("training", "train", cases[0]), ("validation", "val", cases[1])):
        changed = sum(a != b for a, b in zip(data[key], case_digests(now)))
        if changed:
            raise InputError(
                f"{path}: the {what} data differ from the interrupted run's ({changed} of {len(now)} "
                f"cases changed): resume with the same data, or remove --resume and start again "
                f"with --overwrite"
            )


def check_zip(tmp: str) -> None:
    """The written state reads back as a whole (``write_atomically``'s check before the rename)."""
    import zipfile

    with zipfile.ZipFile(tmp) as z:
        bad = z.testzip()
    if bad is not None:
        raise OSError(f"{tmp}: {bad} does not read back")


def save_state(trainer, epoch: int) -> None:
    """The trainer's resumable state after ``epoch``, written atomically (checked to read back)."""
    from dataclasses import asdict as _asdict

    from PromiseSegmentLib.atomic_write import write_atomically

    state = {
        "modules": {n: m.state_dict() for n, m in trainer.adapter.modules().items()},
        "optim": trainer.optim.state_dict(),
        "generator": trainer.gen.get_state(),
        "history": [_asdict(r) for r in trainer.history],
        "best": trainer.best,
        "epoch": epoch,
        "best_modules": trainer.best_state,
        "best_warmup": trainer.best_warmup,
        "best_warmup_apm": trainer.best_warmup_apm,
        "warmup_average": trainer.warmup_average.state(),
        "kept_warmup_average": trainer.kept_warmup_average,
        "warmup_mean_dice": trainer.warmup_mean_dice,
        "config": resume_config(trainer.cfg),
        "planned_epochs": trainer.cfg.epochs,
        "cases": [len(trainer.train), len(trainer.val)],
        "backbone": trainer.engine.backbone.identity,
        "data": trainer.data,
    }
    write_atomically(trainer.state_path, lambda tmp: torch.save(state, tmp), verify=check_zip)


def restore_state(trainer, path: Path) -> Dict:
    """Load an interrupted run's state into ``trainer`` (checked first: ``read_resume_state``); returns it."""
    st = read_resume_state(path, trainer.cfg, (trainer.train, trainer.val))
    if st["backbone"] != trainer.engine.backbone.identity:
        raise InputError(
            f"{path} was written on backbone weights {st['backbone']}, now {trainer.engine.backbone.identity}: "
            f"resume with the same --backbone"
        )
    try:
        for name, m in trainer.adapter.modules().items():
            m.load_state_dict(st["modules"][name])
        trainer.optim.load_state_dict(st["optim"])
        trainer.gen.set_state(st["generator"])
    except Exception as exc:
        raise InputError(
            f"{path} is damaged ({type(exc).__name__}); delete it or start again with --overwrite"
        ) from None
    return st
