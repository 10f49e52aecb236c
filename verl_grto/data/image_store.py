"""Images of dataset rows, read on demand from the parquet files, and the key of each row's image.

verl's agent loop does not keep raw images in its TransferQueue batch (it stores the policy's
processed inputs only), but the tool needs the original image. The store indexes the
``extra_info.sample_id`` column once and reads an image's bytes when asked, so memory holds the
index and a small LRU of recent images, not the dataset.

**Image keys.** Several rows may show the same image (RefCOCO/+/g: one row per sentence, several
sentences and objects per image; ReasonSeg: several queries per image). The tool's encoder is its
expensive part, so its feature cache is keyed by the *image*, not the row: rows that share an image
share its features (:class:`verl_grto.tool.cache.EmbeddingCache`). A row's key is
``"<data_source>/id:<extra_info.image_id>"`` when the converter wrote the dataset's image id (RefCOCO
does), else ``"sha1:<digest of the image bytes>"``: equal bytes, one key, whatever the row.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

#: Rows read at a time while digesting image bytes (bounds the index's memory, not its result).
_DIGEST_BATCH_ROWS = 64


def _image_bytes(entry: Any) -> bytes:
    """The bytes of a row's first image entry (verl's ``{"bytes": ..., "path": ...}`` or raw bytes)."""
    data = entry["bytes"] if isinstance(entry, dict) else entry
    if not isinstance(data, bytes | bytearray):
        raise ValueError(f"image entry holds no bytes (got {type(data).__name__})")
    return bytes(data)


def digest_key(data: bytes) -> str:
    """The image key of raw image bytes: ``sha1:<hex>``."""
    return "sha1:" + hashlib.sha1(data).hexdigest()


class SampleImageStore:
    """Rows' images by ``sample_id`` or by image key, with an LRU of decoded images (``cache_size``)."""

    def __init__(self, files: Iterable[str | Path], cache_size: int = 1024) -> None:
        self._files = [Path(f).expanduser() for f in files]
        self._index: dict[str, tuple[int, int]] = {}  # sample id -> (file, row)
        self._key_of: dict[str, str] = {}  # sample id -> image key
        self._where: dict[str, tuple[int, int]] = {}  # image key -> (file, row) of its first row
        for file_idx, path in enumerate(self._files):
            self._index_file(file_idx, path)
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()  # image key -> HxWx3 uint8
        self._cache_size = cache_size

    def _index_file(self, file_idx: int, path: Path) -> None:
        has_source = "data_source" in pq.read_schema(path).names
        table = pq.read_table(path, columns=["extra_info", "data_source"] if has_source else ["extra_info"])
        extras = table.column("extra_info").to_pylist()
        sources = table.column("data_source").to_pylist() if has_source else [""] * len(extras)
        rows: list[tuple[str, int, str | None]] = []
        for row, (info, source) in enumerate(zip(extras, sources, strict=True)):
            sid = (info or {}).get("sample_id")
            if sid is None:
                raise ValueError(f"{path}: row {row} has no extra_info.sample_id")
            image_id = (info or {}).get("image_id")
            rows.append((str(sid), row, None if image_id is None else f"{source}/id:{image_id}"))
        if any(key is None for _, _, key in rows):
            digests = self._digests(path)
            rows = [(sid, row, key if key is not None else digests[row]) for sid, row, key in rows]
        for sid, row, key in rows:
            if sid in self._index:
                continue  # the first file naming a sample id wins (as verl reads train before val)
            self._index[sid] = (file_idx, row)
            self._key_of[sid] = str(key)
            self._where.setdefault(str(key), (file_idx, row))

    @staticmethod
    def _digests(path: Path) -> list[str]:
        """:func:`digest_key` of every row's first image, streamed a few rows at a time."""
        out: list[str] = []
        parquet = pq.ParquetFile(path)
        for batch in parquet.iter_batches(batch_size=_DIGEST_BATCH_ROWS, columns=["images"]):
            for k, images in enumerate(batch.column("images").to_pylist()):
                try:
                    out.append(digest_key(_image_bytes(images[0])))
                except (ValueError, TypeError, IndexError) as exc:
                    raise ValueError(f"{path}: row {len(out) + k}: unreadable image entry ({exc})") from None
        return out

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self._index

    @property
    def num_images(self) -> int:
        """Distinct images (keys) among the indexed rows."""
        return len(self._where)

    def key(self, sample_id: str) -> str:
        """The image key of a row (rows that show the same image share it)."""
        sid = str(sample_id)
        if sid not in self._key_of:
            raise KeyError(f"sample_id {sid!r} is in none of {[str(f) for f in self._files]}")
        return self._key_of[sid]

    def keys(self, sample_ids: Sequence[str]) -> list[str]:
        return [self.key(s) for s in sample_ids]

    def image_by_key(self, key: str) -> np.ndarray:
        """The image with this key, as HxWx3 uint8."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if key not in self._where:
            raise KeyError(f"image key {key!r} is in none of {[str(f) for f in self._files]}")
        file_idx, row = self._where[key]
        parquet = pq.ParquetFile(self._files[file_idx])
        start = 0
        for group in range(parquet.num_row_groups):  # read only the row group holding the row
            n = parquet.metadata.row_group(group).num_rows
            if row < start + n:
                break
            start += n
        table = parquet.read_row_group(group, columns=["images"]).slice(row - start, 1)
        data = _image_bytes(table.column("images")[0].as_py()[0])
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        self._cache[key] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image

    def image(self, sample_id: str) -> np.ndarray:
        """The row's first image as HxWx3 uint8."""
        return self.image_by_key(self.key(sample_id))

    def images(self, sample_ids: Sequence[str]) -> list[np.ndarray]:
        return [self.image(s) for s in sample_ids]
