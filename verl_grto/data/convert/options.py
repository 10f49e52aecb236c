"""Converter options from ``key=value`` strings (``verl-grto data convert --opt``), typed by the converter's signature.

Why read the signature: every converter documents its options as keyword parameters with type hints
(``splits: list[str] | None``, ``keep_empty: bool | None``...); taking the types from there keeps the
command line in step with the converters, and a typo is an error naming the options that exist
instead of a keyword silently ignored or a string "false" read as True.

Values: ``true``/``false`` (also 1/0, yes/no) for booleans, ``none`` (or an empty value) for an
optional parameter's default behaviour, comma-separated items for lists, anything else as text or
a path.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

#: Parameters that are the converter's positional inputs or belong to the caller, not options.
RESERVED = ("src", "out")
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def converter_options(fn: Callable[..., Any]) -> dict[str, Any]:
    """Keyword options of a converter (a function or a ``functools.partial``): name -> type hint."""
    base, bound = fn, set()
    while isinstance(base, functools.partial):
        bound |= set(base.keywords)
        base = base.func
    hints = typing.get_type_hints(base)
    return {
        name: hints.get(name, str)
        for name, p in inspect.signature(base).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in bound and name not in RESERVED
    }


def _coerce(text: str, hint: Any, key: str) -> Any:
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if text.strip().lower() in ("none", "") and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
        return _coerce(text, hint, key)
    if hint is bool:
        low = text.strip().lower()
        if low not in _TRUE + _FALSE:
            raise ValueError(f"option {key}: expected true or false, got {text!r}")
        return low in _TRUE
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (str,)
        return [_coerce(part.strip(), item, key) for part in text.split(",") if part.strip()]
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"option {key}: expected an integer, got {text!r}") from None
    if hint is Path:
        return Path(text)
    return text


def parse_options(fn: Callable[..., Any], pairs: Sequence[str]) -> dict[str, Any]:
    """``["splits=val,test", "keep_empty=false"]`` -> ``{"splits": ["val", "test"], "keep_empty": False}``.

    Raises ValueError for a pair without ``=``, an option the converter does not take (the message
    lists those it does), a repeated option or a value of the wrong type.
    """
    allowed = converter_options(fn)
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"option {pair!r} is not key=value")
        if key not in allowed:
            raise ValueError(f"unknown option {key!r}; this converter takes: {', '.join(sorted(allowed)) or 'none'}")
        if key in out:
            raise ValueError(f"option {key!r} given twice")
        out[key] = _coerce(value, allowed[key], key)
    return out
