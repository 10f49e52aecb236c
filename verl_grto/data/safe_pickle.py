"""Load annotation pickles (REFER's ``refs(unc).p`` ...) without executing anything they name.

Why: a pickle is a program. ``pickle.load`` on a file downloaded from a mirror runs whatever
callable the file names (``os.system`` included). The REFER annotations are plain data (lists of
dicts of str / int / float), which protocols 0-5 encode with opcodes that need no global at all; a
file that asks for any global beyond the builtin containers and scalars is refused with
:class:`UnsafePickleError` before anything is called.

Python 2 pickles (the REFER files were written by Python 2) store ``str`` as bytes: they are decoded
as UTF-8, and as Latin-1 if that fails.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

#: The only globals a data pickle may name (``__builtin__`` is Python 2's name for ``builtins``).
ALLOWED_GLOBALS = frozenset(
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("dict", "list", "str", "int", "float", "tuple", "bool", "unicode", "long")
)


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global outside :data:`ALLOWED_GLOBALS`; nothing it names was called."""


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, source: str, encoding: str) -> None:
        super().__init__(file, encoding=encoding, fix_imports=False)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self._source}: refusing to load global {module}.{name}; "
                "annotation pickles may only hold builtin containers (dict, list, tuple, str, int, float)"
            )
        py3_name = {"unicode": "str", "long": "int"}.get(name, name)
        return getattr(__import__("builtins"), py3_name)

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refusing persistent id {pid!r}")


def load_data_pickle(path: Path) -> Any:
    """Unpickle ``path`` allowing only builtin containers and scalars.

    Raises UnsafePickleError (naming the file and the global) for anything else, and
    ``pickle.UnpicklingError`` / ``EOFError`` for a truncated or corrupt file.
    """
    raw = Path(path).read_bytes()
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), str(path), "utf-8").load()
    except UnicodeDecodeError:
        return _RestrictedUnpickler(io.BytesIO(raw), str(path), "latin1").load()
