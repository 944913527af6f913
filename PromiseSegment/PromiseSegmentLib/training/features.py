"""Encoded training images: encoded once into a feature store on disk (the image and K augmented versions of
it), or encoded afresh at every step (on-line augmentation, the paper's recipe)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from PromiseSegmentLib.callbacks import CancelFn, ProgressFn
from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.errors import Cancelled
from PromiseSegmentLib.inference.engine import InferenceEngine, mask_to_low_res
from PromiseSegmentLib.model.apm import APM
from PromiseSegmentLib.paths import cache_dir
from PromiseSegmentLib.training.augment import augment
from PromiseSegmentLib.training.batches import Encoded, input_box
from PromiseSegmentLib.training.feature_store import FeatureStore, RecordLayout, existing_layout, remove_store
from PromiseSegmentLib.training.resume import case_digests

PARTS_FOR_WARMUP = ("taps", "target", "box")  # the APM alone never reads the 2 MB image embedding


def encode_case(engine: InferenceEngine, apm: Optional[APM], rgb: np.ndarray, mask: np.ndarray) -> Encoded:
    emb = engine.encode([rgb])[0]
    taps = apm.prepare_taps(emb.taps) if (apm is not None and emb.taps) else []
    spec = engine.spec
    return Encoded(
        emb.features.half(),
        [t.half() for t in taps],
        mask_to_low_res(mask, emb.input_size, spec.image_size)[0] > 0.5,
        input_box(mask, spec, emb.original_size),
        tuple(emb.input_size),
        tuple(emb.original_size),
    )


def augmented(case: Case, seed: int, index: int, version: int):
    """Version ``version`` (1..K) of training image ``index``: the same every run with the same seed."""
    own = torch.Generator().manual_seed(seed * 1_000_003 + index * 101 + version)
    return augment(case.rgb, case.mask, own)


class OnlineFeatures:
    """Every draw encodes the image afresh, augmented when ``do_augment`` (an encode per image per step)."""

    def __init__(
        self, engine: InferenceEngine, cases: List[Case], apm: Optional[APM], gen: torch.Generator, do_augment=True
    ):
        self.engine, self.cases, self.apm, self.gen, self.do_augment = engine, cases, apm, gen, do_augment

    def get(self, indices: Sequence[int], parts: Sequence[str] = ()) -> List[Encoded]:
        out = []
        for i in indices:
            rgb, mask = self.cases[i].rgb, self.cases[i].mask
            if self.do_augment:
                rgb, mask = augment(rgb, mask, self.gen)
            out.append(encode_case(self.engine, self.apm, rgb, mask))
        return out


class StoredFeatures:
    """Training images (each with ``copies`` augmented versions) and selection images, encoded once into a
    ``FeatureStore``; a draw of a training image picks one of its 1 + K versions at random."""

    def __init__(
        self,
        engine: InferenceEngine,
        apm: Optional[APM],
        train: List[Case],
        select: List[Case],
        copies: int,
        seed: int,
        gen: torch.Generator,
        folder: Optional[Path] = None,
    ):
        self.engine, self.apm, self.train, self.select = engine, apm, train, select
        self.versions, self.seed, self.gen = 1 + copies, seed, gen
        self.key = self._key()
        self.owned = folder is None  # a folder the user chose is kept; ours is removed when training ends
        self.folder = Path(folder) if folder else cache_dir() / "training-features" / self.key[:16]
        self.count = len(train) * self.versions + len(select)
        self.store: Optional[FeatureStore] = None

    def _key(self) -> str:
        """What the records depend on: backbone weights and precision, the APM's tap layout, the images."""
        h = hashlib.sha256()
        apm = None if self.apm is None else [self.apm.tap_pool, [n.num_channels for n in self.apm.norms]]
        what = [self.engine.backbone.identity, self.engine.precision_summary, apm, self.versions, self.seed]
        h.update(json.dumps(what).encode())
        for digest in case_digests(self.train) + ["|"] + case_digests(self.select):
            h.update(digest.encode())
        return h.hexdigest()

    def planned(self) -> List[tuple]:
        """Every record as (record, case, image index, version); selection images as version 0."""
        jobs = [(i * self.versions + v, c, i, v) for i, c in enumerate(self.train) for v in range(self.versions)]
        base = len(self.train) * self.versions
        return jobs + [(base + j, c, j, 0) for j, c in enumerate(self.select)]

    def prepare(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelFn] = None) -> int:
        """Encode every record not already in the store; returns how many were encoded now."""
        jobs = self.planned()
        layout, first = existing_layout(self.folder, self.key, self.count), None
        if layout is None:  # a new store: the first image's encoding gives the record layout
            first = encode_case(self.engine, self.apm, jobs[0][1].rgb, jobs[0][1].mask)
            layout = _layout(first)
        self.store = FeatureStore(self.folder, self.key, self.count, layout)
        self.store.check_space()
        todo = [j for j in jobs if not self.store.done[j[0]]]
        for n, (record, case, index, version) in enumerate(todo):
            if cancel is not None and cancel():
                self.store.save_progress()
                raise Cancelled()
            rgb, mask = (case.rgb, case.mask) if version == 0 else augmented(case, self.seed, index, version)
            enc = first if record == 0 and first is not None else encode_case(self.engine, self.apm, rgb, mask)
            self.store.put(record, _record(enc))
            if progress:
                progress(n + 1, len(todo))
        self.store.save_progress()
        return len(todo)

    def get(self, indices: Sequence[int], parts: Sequence[str] = ()) -> List[Encoded]:
        """Training images ``indices``, each as one of its versions drawn at random."""
        if self.versions == 1:
            return [self._read(i, parts) for i in (i * self.versions for i in indices)]
        picks = torch.randint(self.versions, (len(indices),), generator=self.gen).tolist()
        return [self._read(i * self.versions + v, parts) for i, v in zip(indices, picks)]

    def get_selection(self, indices: Sequence[int]) -> List[Encoded]:
        base = len(self.train) * self.versions
        return [self._read(base + j, ()) for j in indices]

    def _read(self, record: int, parts: Sequence[str]) -> Encoded:
        assert self.store is not None, "prepare() first"
        names = ["features", "target", "box"] + self.store.tap_names()
        if parts:
            names = [n for n in names if n in parts or (n.startswith("tap") and "taps" in parts)]
        got = self.store.get(record, names)
        box = got.get("box")
        sizes = self.store.sizes(record)
        return Encoded(
            torch.from_numpy(got["features"].copy()) if "features" in got else None,
            [torch.from_numpy(got[n].copy()) for n in self.store.tap_names() if n in got],
            torch.from_numpy(got["target"].copy()),
            None if box is None or not np.isfinite(box).all() else torch.from_numpy(box.astype(np.float32)),
            sizes[0],
            sizes[1],
        )

    def close(self, finished: bool) -> None:
        """Release the files; a finished run removes a store it made (an interrupted one keeps it for
        ``--resume``)."""
        if self.store is not None:
            self.store.close()
        if finished and self.owned:
            remove_store(self.folder)


def _layout(enc: Encoded) -> RecordLayout:
    assert enc.features is not None
    return RecordLayout(tuple(enc.features.shape), tuple(tuple(t.shape) for t in enc.taps), tuple(enc.target.shape))


def _record(enc: Encoded) -> Dict[str, np.ndarray]:
    assert enc.features is not None
    box = np.full(4, np.nan, np.float32) if enc.box is None else enc.box.numpy()
    out = {
        "features": enc.features.numpy(),
        "target": enc.target.numpy(),
        "box": box,
        "sizes": np.array([*enc.input_size, *enc.original_size], np.int32),
    }
    out.update({f"tap{k}": t.numpy() for k, t in enumerate(enc.taps)})
    return out
