"""Encoded training images: encoded per step (on-line augmentation) or once and kept."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from PromiseSegmentLib.data.datasets import Case
from PromiseSegmentLib.inference.engine import InferenceEngine, mask_to_low_res
from PromiseSegmentLib.model.apm import APM
from PromiseSegmentLib.training.augment import augment
from PromiseSegmentLib.training.batches import Encoded, input_box


class FeatureSource:
    """Encoded training images: computed per step (augmentation) or once and kept (fp16). With ``copies``
    K > 0 (and the cache) each image also has K augmented versions, each made from its own seed and
    encoded once when first drawn; every draw picks one of the 1 + K versions: augmentation at the cost
    of K extra encodes per image instead of one per step."""

    def __init__(
        self,
        engine: InferenceEngine,
        cases: List[Case],
        cache: bool,
        gen: torch.Generator,
        do_augment: bool,
        apm: Optional[APM],
        copies: int = 0,
        seed: int = 0,
    ):
        self.engine, self.cases, self.gen, self.do_augment, self.apm = engine, cases, gen, do_augment, apm
        self.cache: Dict[int, Encoded] = {}  # the images as given
        self.copies: Dict[Tuple[int, int], Encoded] = {}  # (image, version 1..K): augmented versions
        self.use_cache = cache and not do_augment
        self.n_copies, self.seed = (copies if self.use_cache else 0), seed

    def item(self, i: int) -> Encoded:
        version = int(torch.randint(1 + self.n_copies, (), generator=self.gen)) if self.n_copies else 0
        if version:
            if (i, version) not in self.copies:
                own = torch.Generator().manual_seed(self.seed * 1_000_003 + i * 101 + version)
                self.copies[(i, version)] = self._encode(*augment(self.cases[i].rgb, self.cases[i].mask, own))
            return self.copies[(i, version)]
        if i in self.cache:
            return self.cache[i]
        rgb, mask = self.cases[i].rgb, self.cases[i].mask
        if self.do_augment:
            rgb, mask = augment(rgb, mask, self.gen)
        enc = self._encode(rgb, mask)
        if self.use_cache:
            self.cache[i] = enc
        return enc

    def _encode(self, rgb: np.ndarray, mask: np.ndarray) -> Encoded:
        emb = self.engine.encode([rgb])[0]
        taps = self.apm.prepare_taps(emb.taps) if (self.apm is not None and emb.taps) else []
        spec = self.engine.spec
        return Encoded(
            emb.features.half(),
            [t.half() for t in taps],
            mask_to_low_res(mask, emb.input_size, spec.image_size)[0] > 0.5,
            input_box(mask, spec, emb.original_size),
            mask,
            emb.input_size,
            emb.original_size,
        )

    def get(self, indices: Sequence[int]) -> List[Encoded]:
        return [self.item(i) for i in indices]
