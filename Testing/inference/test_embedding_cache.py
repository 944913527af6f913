"""The embedding cache: content-keyed, bounded in bytes, and invisible in results."""

import numpy as np
import torch

from PromiseSegmentLib.data.prompts import Prompts
from PromiseSegmentLib.inference.embedding_cache import EmbeddingCache, image_key
from PromiseSegmentLib.inference.engine import ImageEmbedding, InferenceEngine


def fake_embedding(mb: int) -> ImageEmbedding:
    return ImageEmbedding(torch.zeros(mb * 2**18), (4, 4), (4, 4), None)  # float32: 4 bytes each


def test_lru_eviction_keeps_the_byte_bound():
    cache = EmbeddingCache(max_bytes=3 * 2**20)
    for key in "abc":
        cache.put(key, fake_embedding(1))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", fake_embedding(1))
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 3
    assert cache.bytes == 3 * 2**20
    cache.put("huge", fake_embedding(4))  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    cache.max_bytes = 2**20  # lowered from the console: the oldest go at once
    assert len(cache) == 1 and cache.bytes == 2**20 and cache.get("a") is not None  # the most recent
    cache.max_bytes = 0  # caching off
    assert len(cache) == 0 and cache.bytes == 0
    cache.put("e", fake_embedding(1))
    assert cache.get("e") is None


def test_keys_depend_on_pixels_and_taps():
    image = np.zeros((8, 8, 3), np.uint8)
    other = image.copy()
    other[0, 0, 0] = 1
    assert image_key(image, ()) == image_key(image.copy(), ())
    assert image_key(image, ()) != image_key(other, ())
    assert image_key(image, ()) != image_key(image, (1, 2, 3))


def test_cached_predictions_equal_uncached(tiny_backbone, make_image, rng):
    image = make_image(rng, 90, 120)
    cached = InferenceEngine(tiny_backbone, "cpu", cache=EmbeddingCache())
    plain = InferenceEngine(tiny_backbone, "cpu")
    prompts = Prompts(points=[[60, 40]], labels=[1])
    first = cached.predict(cached.encode([image])[0], prompts)
    again = cached.predict(cached.encode([image])[0], prompts)
    reference = plain.predict(plain.encode([image])[0], prompts)
    assert cached.cache.hits == 1 and cached.cache.misses == 1
    assert np.array_equal(first.logits, again.logits) and np.array_equal(first.logits, reference.logits)
