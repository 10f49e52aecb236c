"""Benchmark converters: official dataset releases -> verl RL parquet (``<out>/<split>.parquet``).

Each converter reads one release layout from a local folder (documented in its module and in
``docs/benchmarks.md``) and returns a :class:`ConversionReport`; the shared rules (skipped rows
reported by file and row, whole-or-nothing output) live in :mod:`verl_grto.data.convert.base`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from verl_grto.data.convert.base import AnnotationFileError, ConversionReport, SkippedRow
from verl_grto.data.convert.cod import convert_cod
from verl_grto.data.convert.earthreason import convert_earthreason
from verl_grto.data.convert.reasonseg import convert_reasonseg
from verl_grto.data.convert.refcoco import convert_refer

#: name -> ``fn(src: Path, out: Path, **opts) -> ConversionReport``
CONVERTERS: dict[str, Callable[..., ConversionReport]] = {
    "reasonseg": convert_reasonseg,
    "refcoco": partial(convert_refer, dataset="refcoco"),
    "refcoco+": partial(convert_refer, dataset="refcoco+"),
    "refcocog": partial(convert_refer, dataset="refcocog"),
    "cod10k": partial(convert_cod, name="cod10k"),
    "camo": partial(convert_cod, name="camo"),
    "nc4k": partial(convert_cod, name="nc4k"),
    "earthreason": convert_earthreason,
}


def convert(name: str, src: Path, out: Path, **opts: Any) -> ConversionReport:
    """Convert dataset ``name`` from its release folder ``src`` into ``out``; see each converter for ``opts``."""
    if name not in CONVERTERS:
        raise KeyError(f"unknown dataset {name!r}; one of {', '.join(CONVERTERS)}")
    return CONVERTERS[name](Path(src), Path(out), **opts)


__all__ = ["CONVERTERS", "AnnotationFileError", "ConversionReport", "SkippedRow", "convert"]
