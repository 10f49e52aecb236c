"""Images of dataset rows by ``sample_id``, read on demand from the parquet files.

verl's agent loop does not keep raw images in its TransferQueue batch (it stores the policy's
processed inputs only), but the tool needs the original image. The store indexes the
``extra_info.sample_id`` column once and reads an image's bytes when asked, so memory holds the
index and a small LRU of recent images, not the dataset.
"""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image


class SampleImageStore:
    def __init__(self, files: Iterable[str | Path], cache_size: int = 1024) -> None:
        self._files = [Path(f).expanduser() for f in files]
        self._index: dict[str, tuple[int, int]] = {}
        for file_idx, path in enumerate(self._files):
            table = pq.read_table(path, columns=["extra_info"])
            for row, info in enumerate(table.column("extra_info").to_pylist()):
                sid = (info or {}).get("sample_id")
                if sid is None:
                    raise ValueError(f"{path}: row {row} has no extra_info.sample_id")
                self._index.setdefault(str(sid), (file_idx, row))
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, sample_id: object) -> bool:
        return str(sample_id) in self._index

    def image(self, sample_id: str) -> np.ndarray:
        """The row's first image as HxWx3 uint8."""
        sid = str(sample_id)
        if sid in self._cache:
            self._cache.move_to_end(sid)
            return self._cache[sid]
        if sid not in self._index:
            raise KeyError(f"sample_id {sid!r} is in none of {[str(f) for f in self._files]}")
        file_idx, row = self._index[sid]
        parquet = pq.ParquetFile(self._files[file_idx])
        start = 0
        for group in range(parquet.num_row_groups):  # read only the row group holding the row
            n = parquet.metadata.row_group(group).num_rows
            if row < start + n:
                break
            start += n
        table = parquet.read_row_group(group, columns=["images"]).slice(row - start, 1)
        entry = table.column("images")[0].as_py()[0]
        data = entry["bytes"] if isinstance(entry, dict) else entry
        image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        self._cache[sid] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image

    def images(self, sample_ids: Sequence[str]) -> list[np.ndarray]:
        return [self.image(s) for s in sample_ids]
