"""Untrusted files: no code path in the package unpickles without a restriction.

Two halves:

* a static check (``ast``, not regex) over every ``verl_grto/**/*.py``: every ``torch.load`` passes the
  literal ``weights_only=True``, and nothing calls ``pickle.load``/``loads``/``Unpickler``, ``_pickle``,
  ``cPickle``, ``dill``, ``cloudpickle``, ``joblib.load``, ``pandas.read_pickle`` or
  ``numpy.load(allow_pickle=...)``. The one exception is the restricted loader
  :mod:`verl_grto.data.safe_pickle`, which may subclass ``pickle.Unpickler`` only if it overrides
  ``find_class``. The checker has its own tests on planted snippets, so it cannot pass vacuously;
* behaviour: the official SAM2 ``.pt`` conversion refuses a checkpoint that needs a global outside
  torch's weights-only allow-list, naming the file and the global, without running anything.

See docs/reliability.md ("Untrusted files").
"""

from __future__ import annotations

import ast
import importlib
import os
import pickle
from pathlib import Path

import pytest
import torch

from verl_grto.cli import main
from verl_grto.tool.convert import UnsafeCheckpointError, convert_meta_checkpoint, load_meta_state_dict

PACKAGE = Path(__file__).resolve().parents[1] / "verl_grto"
#: The one module allowed to touch ``pickle.Unpickler`` (by subclassing it with a ``find_class``).
RESTRICTED_LOADER = PACKAGE / "data" / "safe_pickle.py"

_TORCH_LOADS = {"torch.load", "torch.serialization.load"}
_PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle"}
_PICKLE_LOADERS = {f"{m}.{f}" for m in _PICKLE_MODULES for f in ("load", "loads", "Unpickler")} | {
    "joblib.load",
    "pandas.read_pickle",
}
_UNPICKLER_BASES = {f"{m}.Unpickler" for m in _PICKLE_MODULES}


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as (``np`` -> ``numpy``, ``load`` -> ``torch.load``)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names[alias.asname] = alias.name
                else:  # `import torch.serialization` binds `torch`
                    root = alias.name.split(".")[0]
                    names[root] = root
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``th.serialization.load`` -> ``torch.serialization.load`` (resolving the root through imports)."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _literal(node: ast.Call, keyword: str) -> object:
    """The literal value of `keyword=` in the call; a sentinel if absent or not a constant."""
    for kw in node.keywords:
        if kw.arg == keyword:
            return kw.value.value if isinstance(kw.value, ast.Constant) else _NOT_LITERAL
    return _ABSENT


_ABSENT, _NOT_LITERAL = object(), object()


def unsafe_loads(source: str, filename: str = "<string>", *, restricted_loader: bool = False) -> list[str]:
    """``file:line: what`` for every unrestricted unpickling in `source`.

    `restricted_loader` marks the project's restricted-unpickler module: there (only) a class may
    subclass ``pickle.Unpickler``, and only if it overrides ``find_class``. Bare ``pickle.load`` is
    refused there too.
    """
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    findings: list[tuple[int, str]] = []
    checked: set[int] = set()  # ids of nodes already judged (a call's func, an allowed class base)

    def report(node: ast.AST, what: str) -> None:
        findings.append((node.lineno, f"{filename}:{node.lineno}: {what}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if _dotted(base, aliases) not in _UNPICKLER_BASES:
                    continue
                checked.add(id(base))
                overrides = any(
                    isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == "find_class"
                    for item in node.body
                )
                if not restricted_loader:
                    report(node, f"class {node.name} subclasses {ast.unparse(base)} outside the restricted loader")
                elif not overrides:
                    report(node, f"class {node.name} subclasses {ast.unparse(base)} without overriding find_class")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func, aliases)
            checked.add(id(node.func))
            if name in _TORCH_LOADS:
                if _literal(node, "weights_only") is not True:
                    report(node, f"{ast.unparse(node.func)}(...) without the literal weights_only=True")
            elif name in _PICKLE_LOADERS:
                report(node, f"{ast.unparse(node.func)}(...) unpickles without a restriction")
            elif name == "numpy.load":
                allow = _literal(node, "allow_pickle")
                if allow is not _ABSENT and allow is not False:
                    report(node, f"{ast.unparse(node.func)}(..., allow_pickle=...) may unpickle")
                elif any(kw.arg is None for kw in node.keywords):
                    report(node, f"{ast.unparse(node.func)}(..., **kwargs) may pass allow_pickle=True")
    # A loader passed around uncalled (`loader = torch.load`) cannot be checked at its call.
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute | ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in checked:
            name = _dotted(node, aliases)
            if name in _TORCH_LOADS | _PICKLE_LOADERS:
                report(node, f"{ast.unparse(node)} referenced without a checkable call")
    return [text for _, text in sorted(set(findings))]


# --- the checker itself: it must catch each planted bad form and accept the good ones -------------

BAD = [  # (source, line of the finding)
    ("import torch\ntorch.load('x.pt')", 2),
    ("import torch\ntorch.load('x.pt', map_location='cpu', weights_only=False)", 2),
    ("import torch\nflag = True\ntorch.load('x.pt', weights_only=flag)", 3),
    ("import torch\ntorch.load('x.pt', **{'weights_only': True})", 2),
    ("import torch as th\nth.load('x.pt')", 2),
    ("from torch import load\nload('x.pt')", 2),
    ("from torch import load as tl\ntl('x.pt', map_location='cpu')", 2),
    ("import torch.serialization\ntorch.serialization.load('x.pt')", 2),
    ("from torch import serialization as ser\nser.load('x.pt')", 2),
    ("import torch\n\ndef f(p):\n    return torch.load(p)", 4),
    ("import torch\nloader = torch.load", 2),
    ("import pickle\npickle.load(f)", 2),
    ("import pickle\npickle.loads(b)", 2),
    ("import pickle as pk\npk.Unpickler(f).load()", 2),
    ("from pickle import loads\nloads(b)", 2),
    ("from pickle import Unpickler\nUnpickler(f).load()", 2),
    ("import _pickle\n_pickle.loads(b)", 2),
    ("import cPickle\ncPickle.load(f)", 2),
    ("import dill\ndill.load(f)", 2),
    ("import cloudpickle\ncloudpickle.loads(b)", 2),
    ("import joblib\njoblib.load('m.joblib')", 2),
    ("from joblib import load\nload('m.joblib')", 2),
    ("import numpy as np\nnp.load('a.npy', allow_pickle=True)", 2),
    ("import numpy\nnumpy.load('a.npy', **kw)", 2),
    ("import pandas as pd\npd.read_pickle('x.pkl')", 2),
    ("from pandas import read_pickle\nread_pickle('x.pkl')", 2),
    ("import pickle\n\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise KeyError(m)", 3),
]

GOOD = [
    "import torch\ntorch.load('x.pt', map_location='cpu', weights_only=True)",
    "from torch import load\nload('x.pt', weights_only=True)",
    "import torch\ntorch.serialization.load('x.pt', weights_only=True)",
    "import torch\ntorch.save({'a': 1}, 'x.pt')",
    "import numpy as np\nnp.load('a.npy')",
    "import numpy as np\nnp.load('a.npz', allow_pickle=False)",
    "import pickle\npickle.dump(obj, f)\nblob = pickle.dumps(obj)\nerr = pickle.UnpicklingError",
    "from safetensors.torch import load_file\nload_file('model.safetensors')",
    "import json\njson.load(f)",
    "def load(p):\n    return p\n\nload('x.pt')",  # a local `load`, not torch's
]


@pytest.mark.parametrize(("source", "line"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_checker_catches_planted_unsafe_load(source, line):
    findings = unsafe_loads(source, "planted.py")
    assert len(findings) == 1 and findings[0].startswith(f"planted.py:{line}: "), findings


@pytest.mark.parametrize("source", GOOD, ids=[f"good{i}" for i in range(len(GOOD))])
def test_checker_accepts_safe_forms(source):
    assert unsafe_loads(source, "good.py") == []


def test_checker_restricted_loader_exception_is_narrow():
    subclass = (
        "import pickle\n\nclass U(pickle.Unpickler):\n    def find_class(self, m, n):\n        raise KeyError(m)\n"
    )
    assert unsafe_loads(subclass, "loader.py", restricted_loader=True) == []
    # without find_class the subclass is as unrestricted as pickle.Unpickler itself
    no_override = "import pickle\n\nclass U(pickle.Unpickler):\n    pass\n"
    assert [f.split(": ")[0] for f in unsafe_loads(no_override, "loader.py", restricted_loader=True)] == ["loader.py:3"]
    # the exemption covers subclassing only: a bare pickle.load is refused even in the loader module
    bare = subclass + "obj = pickle.load(f)\n"
    assert [f.split(": ")[0] for f in unsafe_loads(bare, "loader.py", restricted_loader=True)] == ["loader.py:6"]


# --- the package ----------------------------------------------------------------------------------


def test_package_has_no_unrestricted_unpickling():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 50, f"walked only {len(files)} files under {PACKAGE}: wrong root?"
    assert RESTRICTED_LOADER in files
    findings = []
    for path in files:
        rel = str(path.relative_to(PACKAGE.parent))
        findings += unsafe_loads(path.read_text(encoding="utf-8"), rel, restricted_loader=path == RESTRICTED_LOADER)
    assert findings == [], "unrestricted unpickling (use weights_only=True / safetensors / safe_pickle):\n" + "\n".join(
        findings
    )


def test_restricted_loader_subclasses_unpickler_and_overrides_find_class():
    tree = ast.parse(RESTRICTED_LOADER.read_text(encoding="utf-8"))
    aliases = _aliases(tree)
    classes = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef) and any(_dotted(b, aliases) == "pickle.Unpickler" for b in node.bases)
    ]
    assert classes, f"{RESTRICTED_LOADER} defines no pickle.Unpickler subclass"
    module = importlib.import_module("verl_grto.data.safe_pickle")
    for name in classes:
        cls = getattr(module, name)
        assert issubclass(cls, pickle.Unpickler)
        assert "find_class" in vars(cls) and cls.find_class is not pickle.Unpickler.find_class


# --- the official SAM2 .pt conversion refuses a checkpoint that needs a disallowed global ----------

RAN: list[str] = []


def _mark() -> None:
    RAN.append("ran")


class PlainObject:
    """A custom class: torch's weights-only unpickler has never heard of it."""


class RunsOnLoad:
    """Unpickling this calls `_mark` (the classic pickle payload, harmless here)."""

    def __reduce__(self):
        return (_mark, ())


class RunsShell:
    """Unpickling this would run a shell command (`os` is on torch's blocklist)."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def _evil_checkpoint(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"sam_mask_decoder.conv_s0.weight": torch.zeros(2, 2)}, "evil": payload}, path)
    return path


@pytest.mark.parametrize(
    ("make_payload", "global_name"),
    [
        (lambda flag: PlainObject(), f"{PlainObject.__module__}.PlainObject"),
        (lambda flag: RunsOnLoad(), f"{_mark.__module__}._mark"),
        (RunsShell, f"{os.system.__module__}.system"),  # `posix.system` on Linux
    ],
    ids=["custom-class", "reduce-to-function", "os.system"],
)
def test_conversion_refuses_checkpoint_needing_disallowed_global(tmp_path, make_payload, global_name):
    flag = tmp_path / "ran"
    RAN.clear()
    path = _evil_checkpoint(tmp_path, make_payload(flag))

    with pytest.raises(UnsafeCheckpointError) as info:
        load_meta_state_dict(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}: refusing to load")
    assert f"needs global {global_name}, which is not allowed" in message
    assert "weights_only=True" in message and "weights_only=False" not in message  # never advise the unsafe load
    assert "\n" not in message and "\x1b" not in message  # one line, no terminal escapes
    assert info.value.path == str(path) and info.value.global_name == global_name
    assert isinstance(info.value, ValueError)  # callers that catch "not a checkpoint" catch this too
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert RAN == [] and not flag.exists()  # nothing the file names was run

    # the conversion entry point refuses before building any model (no Meta `sam2` package needed)
    with pytest.raises(UnsafeCheckpointError, match="not allowed"):
        convert_meta_checkpoint(str(path), "sam2.1_hiera_t")
    assert RAN == [] and not flag.exists()


def test_cli_convert_reports_disallowed_global_in_one_line(tmp_path, capsys):
    path = _evil_checkpoint(tmp_path, PlainObject())
    out = tmp_path / "tool"
    assert main(["convert-sam2", "--checkpoint", str(path), "--config", "sam2.1_hiera_t", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("verl-grto: error: --checkpoint ") and "\n" not in err
    assert f"needs global {PlainObject.__module__}.PlainObject, which is not allowed" in err
    assert not out.exists()


def test_clean_checkpoint_still_loads(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"model": {"sam_mask_decoder.conv_s0.weight": torch.ones(2, 2)}}, path)
    assert torch.equal(load_meta_state_dict(str(path))["sam_mask_decoder.conv_s0.weight"], torch.ones(2, 2))


def test_unreadable_checkpoint_is_one_line_and_never_advises_weights_only_false(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")  # torch's weights-only unpickler: "Unsupported operand 110"
    with pytest.raises(ValueError) as info:
        load_meta_state_dict(str(junk))
    message = str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)  # corrupt, not unsafe
    assert message.startswith(f"{junk} is not a readable torch checkpoint (UnpicklingError: ")
    assert "\n" not in message and "\x1b" not in message and "weights_only=False" not in message
