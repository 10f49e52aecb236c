"""EmbeddingCache: each distinct image is encoded once per step, whatever the number of rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tool_helpers import random_image, tiny_tool

from verl_grto.tool.cache import EmbeddingCache, features_nbytes
from verl_grto.tool.engine import ToolBatch, ToolEngine
from verl_grto.tool.prompts import ObjectPrompt


@pytest.fixture(scope="module")
def tool():
    return tiny_tool(seed=0).eval()


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return {sid: random_image(rng, 64 + 16 * i, 96) for i, sid in enumerate("abc")}


def test_repeated_ids_are_encoded_once(tool, images):
    cache = EmbeddingCache(tool)
    ids = ["a", "b", "a", "c", "b", "a"]
    features = cache.get(ids, [images[i] for i in ids])
    assert cache.images_encoded == 3 and cache.encoder_calls == 1 and len(cache) == 3
    assert len(features) == len(ids) and features.original_sizes[3] == images["c"].shape[:2]
    cache.get(["c", "a"])  # cached: no images needed, no encoding
    assert cache.images_encoded == 3
    cache.clear()
    cache.get(["a"], [images["a"]])
    assert cache.images_encoded == 4


def test_cached_features_equal_direct_encoding(tool, images):
    cache = EmbeddingCache(tool)
    cached = cache.get(["b", "a"], [images["b"], images["a"]])
    direct = tool.encode([images["b"], images["a"]])
    assert torch.equal(cached.image_embeddings, direct.image_embeddings)
    for c, d in zip(cached.high_res_features, direct.high_res_features, strict=True):
        assert torch.equal(c, d)


def test_encoding_is_chunked(tool, images):
    cache = EmbeddingCache(tool, encode_batch_size=2)
    cache.get(list("abc"), list(images.values()))
    assert cache.encoder_calls == 2 and cache.images_encoded == 3


def test_missing_image_and_id_clash_are_errors(tool, images):
    cache = EmbeddingCache(tool)
    with pytest.raises(KeyError, match="not cached"):
        cache.get(["a"], [None])
    cache.get(["a"], [images["a"]])
    with pytest.raises(ValueError, match="another image size"):
        cache.get(["a"], [images["b"]])


def test_engine_encodes_distinct_images_not_rollouts(images):
    """A step with 3 images x G=4 rollouts: predict (reward) and update both run, the encoder sees 3 images."""
    engine = ToolEngine(tiny_tool(seed=0))
    group = 4
    ids = list("abc")
    index = [i for i in range(len(ids)) for _ in range(group)]
    prompts = [[ObjectPrompt((5.0, 5.0, 40.0, 40.0))] for _ in index]
    masks = [np.zeros(images[ids[i]].shape[:2], dtype=bool) for i in index]
    for m in masks:
        m[5:40, 5:40] = True
    batch = ToolBatch(ids, [images[i] for i in ids], index, prompts, masks)
    engine.begin_step()
    engine.predict(batch)
    engine.update(batch)
    assert engine.cache.images_encoded == len(ids)
    engine.begin_step()
    engine.predict(batch)
    assert engine.cache.images_encoded == 2 * len(ids)


def test_byte_bound_evicts_least_recently_used(tool, images):
    """BTO keeps features across epochs under a memory bound: the least recently used image goes first."""
    per_image = features_nbytes(tool.encode([images["a"]]))
    cache = EmbeddingCache(tool, max_bytes=2 * per_image)
    cache.get(["a", "b"], [images["a"], images["b"]])
    cache.get(["a"])  # touch a: b is now the least recently used
    cache.get(["c"], [images["c"]])
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.evictions == 1 and cache.nbytes == 2 * per_image and cache.images_encoded == 3
    # one call's own images are served whole even beyond the bound, then trimmed by later calls
    cache.get(list("abc"), [images["a"], images["b"], None])
    assert len(cache) == 3 and cache.nbytes == 3 * per_image
    cache.get(["c"])
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    cache.clear()
    assert cache.nbytes == 0
