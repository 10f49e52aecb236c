"""Cache of image features keyed by image: per step in GRTO, across epochs in BTO.

Why: a GRTO step has G rollouts per prompt image, and the tool is called for prediction
(reward) and again for the update. Encoding is by far the most expensive part of SAM2, so
each distinct image must be encoded once per step, however many rollouts, calls or dataset rows
(RefCOCO: one row per sentence) use it: the key is the image's
(:class:`verl_grto.data.image_store.SampleImageStore`), not the row's. The caller clears the cache
at the start of each step; features depend on the frozen encoder only, so they stay valid while the
decoder trains within the step.

BTO (`verl_grto.algorithm.bto`) trains the tool for several epochs on a fixed buffer, so
it keeps the cache for the whole stage: every image is encoded once when the buffer's features fit,
and at most once per epoch otherwise (its epoch order is cache-aware). A dataset's features need not
fit in memory (SAM2-L at 1024 px: ~17 MB per image, ~88 MB with raw high-resolution features when
`conv_s0`/`conv_s1` train), hence the `max_bytes` bound, which evicts the least recently used images.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from verl_grto.tool.model import ImageFeatures, SegmentationTool
from verl_grto.tool.preprocess import ImageLike, original_size


def features_nbytes(features: ImageFeatures) -> int:
    """Memory held by cached features (embeddings and both high-resolution levels)."""
    tensors = (features.image_embeddings, *features.high_res_features)
    return sum(t.numel() * t.element_size() for t in tensors)


class EmbeddingCache:
    """Encodes unseen images in one batch and serves cached features for the rest.

    With `max_bytes` set, least recently used images are evicted once the cached features exceed
    it; the images of the current `get` call are never evicted by that call, so one call's
    images may exceed the bound until the next call.
    """

    def __init__(self, tool: SegmentationTool, encode_batch_size: int = 8, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0 or None, got {max_bytes}")
        self.tool = tool
        self.encode_batch_size = encode_batch_size  # bounds encoder activation memory
        self.max_bytes = max_bytes
        self._features: OrderedDict[Hashable, ImageFeatures] = OrderedDict()  # least recently used first
        self.nbytes = 0  # memory of the cached features
        self.images_encoded = 0  # distinct images sent through the encoder since construction
        self.encoder_calls = 0  # batched encoder invocations since construction
        self.evictions = 0  # images dropped to respect max_bytes since construction

    def __contains__(self, sample_id: Hashable) -> bool:
        return sample_id in self._features

    def __len__(self) -> int:
        return len(self._features)

    def clear(self) -> None:
        """Drop all cached features (call once per training step)."""
        self._features.clear()
        self.nbytes = 0

    def _evict(self, keep: set[Hashable]) -> None:
        if self.max_bytes is None:
            return
        for sid in list(self._features):
            if self.nbytes <= self.max_bytes:
                break
            if sid not in keep:
                self.nbytes -= features_nbytes(self._features.pop(sid))
                self.evictions += 1

    @property
    def bytes_per_image(self) -> int | None:
        """Bytes of one image's cached features (all images have the same), None before the first encode."""
        return self.nbytes // len(self._features) if self._features else None

    def get(self, sample_ids: Sequence[Hashable], images: Sequence[ImageLike | None] | None = None) -> ImageFeatures:
        """Features for the image keys `sample_ids`, in order; `images[i]` is needed only for keys not yet cached.

        Repeated keys in one call are encoded once. A cached key given an image of another size
        raises, since that means two different images share a key.
        """
        if images is not None and len(images) != len(sample_ids):
            raise ValueError(f"{len(sample_ids)} sample ids but {len(images)} images")
        pending: dict[Hashable, ImageLike] = {}
        for i, sid in enumerate(sample_ids):
            image = images[i] if images is not None else None
            if sid in self._features:
                if image is not None and original_size(image) != self._features[sid].original_sizes[0]:
                    raise ValueError(f"sample id {sid!r} is cached with another image size")
                self._features.move_to_end(sid)
            elif sid not in pending:
                if image is None:
                    raise KeyError(f"sample id {sid!r} is not cached and no image was given")
                pending[sid] = image
        ids = list(pending)
        for start in range(0, len(ids), self.encode_batch_size):
            chunk = ids[start : start + self.encode_batch_size]
            features = self.tool.encode([pending[sid] for sid in chunk])
            self.encoder_calls += 1
            self.images_encoded += len(chunk)
            for row, sid in enumerate(chunk):
                self._features[sid] = features.select([row])
                self.nbytes += features_nbytes(self._features[sid])
        out = ImageFeatures.concat([self._features[sid] for sid in sample_ids])
        self._evict(keep=set(sample_ids))
        return out
