"""Write verl RL parquet files whole or not at all, streaming rows in bounded memory.

Every converter (synthetic, RefCOCO, ReasonSeg, camouflage sets...) ends by writing records from
:meth:`verl_grto.data.schema.RLRow.to_record`. A crash half-way must not leave a truncated parquet
that verl would later read as a smaller dataset, so the file is written under a temporary name and
renamed into place (see :mod:`verl_grto.atomic`).

Rows embed their image bytes, so a split can be far larger than memory (RefCOCO train: about 120k
rows of COCO JPEGs, about 19 GB of row
bytes). :class:`AtomicParquetWriter` therefore consumes rows one at a time
and writes a parquet row group whenever it has buffered ``row_group_rows`` rows or about
``row_group_bytes`` bytes of payload: memory holds one row group (as Python rows, then as the Arrow
table being encoded), never the split. Small row groups also help readers that fetch one row at a
time (:class:`verl_grto.data.image_store.SampleImageStore` reads only the row group holding a row).

Parquet's dictionary encoding (pyarrow's default) stores equal values once per row group, so an
image repeated by consecutive rows (several RefCOCO sentences of one image) costs its bytes about
once per row group on disk. Readers still get one copy per row: verl's loader (Hugging Face
``datasets``) materialises every row's bytes in its Arrow cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_grto.atomic import atomic_file

#: A row group is written once this many rows are buffered...
DEFAULT_ROW_GROUP_ROWS = 1024
#: ... or once the buffered rows hold about this many bytes of strings and bytes (images).
DEFAULT_ROW_GROUP_BYTES = 16 * 2**20


def _payload_bytes(value: Any) -> int:
    """About how many bytes ``value`` adds to a row group: the length of its strings and bytes."""
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    if isinstance(value, dict):
        return sum(_payload_bytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_payload_bytes(v) for v in value)
    return 8


class AtomicParquetWriter:
    """Stream rows (dicts with the same keys) into one parquet file, published only when complete.

    ::

        with AtomicParquetWriter(path) as writer:
            for record in records:
                writer.write(record)

    Rows go to a temporary file beside ``path``; leaving the ``with`` block normally writes the last
    row group, closes the file and renames it onto ``path`` (an existing file is replaced only
    then). Any exception inside the block, or while finishing, removes the temporary file and leaves
    ``path`` as it was. Leaving the block without a single row raises ValueError and writes nothing:
    an empty file has no schema and would only fail later, inside verl.

    The column types are ``schema`` when given, else inferred from the first row group and kept for
    the rest of the file; a later row that does not fit them (another type, a column that was all
    null in the first group) raises ValueError naming its rows.
    """

    def __init__(
        self,
        path: Path | str,
        schema: pa.Schema | None = None,
        *,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
    ) -> None:
        if row_group_rows < 1 or row_group_bytes < 1:
            raise ValueError(
                f"row_group_rows and row_group_bytes must be positive, got {row_group_rows}, {row_group_bytes}"
            )
        self.path = Path(path)
        self.schema = schema
        self._schema_given = schema is not None
        self.row_group_rows = row_group_rows
        self.row_group_bytes = row_group_bytes
        self.num_rows = 0  # rows accepted so far (written or buffered)
        self.num_row_groups = 0
        self._buffer: list[dict[str, Any]] = []
        self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._publish: contextlib.AbstractContextManager[Path] | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> AtomicParquetWriter:
        if self._publish is not None:
            raise RuntimeError(f"writer of {self.path} is already open")
        publish = atomic_file(self.path)
        self._tmp = publish.__enter__()
        self._publish = publish
        return self

    def write(self, record: dict[str, Any]) -> None:
        """Add one row; writes a row group when the buffer is full."""
        if self._publish is None:
            raise RuntimeError(f"writer of {self.path} is not open (use it in a with block)")
        self._buffer.append(record)
        self._buffered_bytes += _payload_bytes(record)
        self.num_rows += 1
        if len(self._buffer) >= self.row_group_rows or self._buffered_bytes >= self.row_group_bytes:
            self._flush()

    def write_all(self, records: Iterable[dict[str, Any]]) -> int:
        """Write every row of ``records`` (consumed lazily); returns the number of rows written so far."""
        for record in records:
            self.write(record)
        return self.num_rows

    def _flush(self) -> None:
        if not self._buffer:
            return
        first = self.num_rows - len(self._buffer)
        try:
            table = pa.Table.from_pylist(self._buffer, schema=self.schema)
        except (pa.ArrowException, TypeError, ValueError) as exc:
            if self._schema_given:
                problem = "do not fit the given schema"
            elif self._writer is not None:
                problem = "do not fit the schema inferred from the first row group (pass schema=)"
            else:
                problem = "have no common column types"
            raise ValueError(f"{self.path}: rows {first}-{self.num_rows - 1} {problem}: {exc}") from exc
        self._buffer, self._buffered_bytes = [], 0
        if self._writer is None:
            self.schema = table.schema
            assert self._tmp is not None
            # one write batch per row group: the dictionary encoder sees the whole group before it may fall back
            # to plain encoding, so equal values (an image shared by consecutive rows) are stored once per group
            self._writer = pq.ParquetWriter(self._tmp, table.schema, write_batch_size=max(self.row_group_rows, 1024))
        self._writer.write_table(table)
        self.num_row_groups += 1

    def _close_quietly(self) -> None:
        self._buffer, self._buffered_bytes = [], 0
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        publish, self._publish = self._publish, None
        assert publish is not None
        if exc_type is None:
            try:
                self._flush()
                if self.num_rows == 0:
                    raise ValueError(f"refusing to write {self.path}: no rows")
                assert self._writer is not None
                self._writer.close()
                self._writer = None
            except BaseException as err:
                self._close_quietly()
                publish.__exit__(type(err), err, err.__traceback__)  # removes the temporary file
                raise
            return publish.__exit__(None, None, None)  # renames the complete file onto path
        self._close_quietly()
        return publish.__exit__(exc_type, exc, tb)  # removes the temporary file; the exception propagates


def write_rows_atomic(
    records: Iterable[dict[str, Any]],
    path: Path,
    schema: pa.Schema | None = None,
    *,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    row_group_bytes: int = DEFAULT_ROW_GROUP_BYTES,
) -> Path:
    """Write ``records`` (one dict per row, same keys in every row) as one parquet file at ``path``.

    ``records`` is consumed lazily through :class:`AtomicParquetWriter`, so a generator of rows is
    written in the memory of one row group. Column types are ``schema``, else inferred from the
    first row group. Raises ValueError for no rows. Any exception (also one raised while iterating
    ``records``) leaves ``path`` untouched and no temporary file behind.
    """
    with AtomicParquetWriter(path, schema, row_group_rows=row_group_rows, row_group_bytes=row_group_bytes) as writer:
        writer.write_all(records)
    return Path(path)


def write_without_rows(src: Path | str, drop: Iterable[int], dst: Path | str) -> int:
    """Copy the parquet ``src`` to ``dst`` without the rows whose 0-based indices are in ``drop``.

    Why a copy: verl's dataset reads whole files, so training without some rows means a file without
    them (the source may be shared or read-only). Row groups are copied one at a time with their
    schema unchanged (no round trip through Python objects), and ``dst`` appears only when complete.
    Returns the number of rows written; raises ValueError when every row would be dropped (an empty
    file has nothing to train on, and verl would fail on it later).
    """
    dropped = set(drop)
    source = pq.ParquetFile(src)
    n_rows = source.metadata.num_rows
    if n_rows - sum(1 for i in dropped if 0 <= i < n_rows) <= 0:
        raise ValueError(f"refusing to write {dst}: every row of {src} is dropped")
    kept, start = 0, 0
    with atomic_file(Path(dst)) as tmp, pq.ParquetWriter(tmp, source.schema_arrow) as writer:
        for group in range(source.num_row_groups):
            table = source.read_row_group(group)
            keep = [i for i in range(table.num_rows) if start + i not in dropped]
            start += table.num_rows
            if keep:
                writer.write_table(table.take(keep))
                kept += len(keep)
    return kept
