"""Encoder outputs kept in memory, keyed by the exact pixels that were encoded.

The key is a hash of the uint8 RGB slice (plus which encoder taps it holds), so a repeated run, a new click
on an already-encoded slice, or a propagation that revisits a slice re-runs only the decoder - and
an edited volume or a changed intensity window can never return a stale embedding.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np


def image_key(image: np.ndarray, capture: Sequence[object]) -> str:
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((image.shape, str(image.dtype), tuple(capture))).encode())
    h.update(np.ascontiguousarray(image).data)
    return h.hexdigest()


def _nbytes(emb) -> int:
    tensors = [emb.features] + list(emb.taps or [])
    return sum(t.numel() * t.element_size() for t in tensors)


class EmbeddingCache:
    """Least-recently-used cache bounded in bytes (ViT-B with APM blocks: ~41 MB per slice in fp32)."""

    def __init__(self, max_bytes: int = 1 << 30):
        self._items: "OrderedDict[str, object]" = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0
        self.max_bytes = max_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        """Lowering the bound (0 = no caching) frees memory at once."""
        self._max_bytes = int(value)
        self._evict()

    def _evict(self) -> None:
        while self.bytes > self._max_bytes:
            _, old = self._items.popitem(last=False)
            self.bytes -= _nbytes(old)

    def get(self, key: str):
        emb = self._items.get(key)
        if emb is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return emb

    def put(self, key: str, emb) -> None:
        size = _nbytes(emb)
        if size > self.max_bytes:
            return
        if key in self._items:
            self.bytes -= _nbytes(self._items.pop(key))
        self._items[key] = emb
        self.bytes += size
        self._evict()

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._items)


def lookup(cache: Optional[EmbeddingCache], image: np.ndarray, capture: Sequence[object]):
    """(key, cached embedding or None); no key is computed without a cache."""
    if cache is None:
        return None, None
    key = image_key(image, capture)
    return key, cache.get(key)
