"""Write verl RL parquet files whole or not at all.

Every converter (synthetic, RefCOCO, ReasonSeg, camouflage sets...) ends by writing records from
:meth:`verl_grto.data.schema.RLRow.to_record`. A crash half-way must not leave a truncated parquet
that verl would later read as a smaller dataset, so the file is written under a temporary name and
renamed into place (see :mod:`verl_grto.atomic`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from verl_grto.atomic import atomic_file


def write_rows_atomic(records: Iterable[dict[str, Any]], path: Path, schema: pa.Schema | None = None) -> Path:
    """Write ``records`` (one dict per row, same keys in every row) as one parquet file at ``path``.

    The column types are inferred from the rows unless ``schema`` is given. Raises ValueError for no
    rows: an empty file has no schema and would only fail later, inside verl. Any exception (also
    one raised while iterating ``records``) leaves ``path`` untouched and no temporary file behind.
    """
    rows = list(records)
    if not rows:
        raise ValueError(f"refusing to write {path}: no rows")
    table = pa.Table.from_pylist(rows, schema=schema)
    with atomic_file(Path(path)) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
