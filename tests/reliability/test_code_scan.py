"""No code path deserialises by running code: an AST scan of every .py file of the project.

Refused: pickle / cPickle / _pickle / dill / marshal / shelve / joblib loads (and `pickle.Unpickler`),
`pandas.read_pickle`, `torch.load` without `weights_only=True`, `numpy.load(..., allow_pickle=True)`,
`yaml.load` without a safe loader (and `yaml.unsafe_load` / `full_load`), and the `eval` / `exec`
builtins. Dumping is allowed (`stages.data.encode.split_point` hashes `pickle.dumps` of its own
segments); only loading runs code. Nothing in tests/ needs an exemption: the pickle test in
tests/test_checkpoint_errors.py writes a pickle and patches `pickle.loads`, it never calls it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("ernie", "pipeline", "stages", "bench", "tests")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "marshal", "shelve", "joblib", "cloudpickle"}
LOADERS = {"load", "loads", "Unpickler", "open"}  # `open`: shelve.open
UNSAFE_YAML = {"yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all", "yaml.full_load_all"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted name it stands for (`np` -> numpy, `loads` -> pickle.loads)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                names[alias.asname or top] = alias.name if alias.asname else top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.expr | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """`line: what` for every call in `source` that would deserialise by running code."""
    tree = ast.parse(source, filename=filename)
    aliases = _aliases(tree)
    found = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        name = _dotted(call.func, aliases)
        if name is None:
            continue
        module, _, attr = name.rpartition(".")
        why = None
        if module.split(".")[0] in PICKLE_MODULES and attr in LOADERS:
            why = f"{name}: unpickling runs code"
        elif name == "pandas.read_pickle":
            why = f"{name}: unpickling runs code"
        elif name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            why = "torch.load without weights_only=True"
        elif name == "numpy.load" and not (_keyword(call, "allow_pickle") is None or _is_false(call, "allow_pickle")):
            why = "numpy.load with allow_pickle"
        elif name in UNSAFE_YAML:
            why = f"{name}: builds arbitrary objects"
        elif name in ("yaml.load", "yaml.load_all") and not _safe_loader(call, aliases):
            why = f"{name} without a safe Loader"
        elif name in ("eval", "exec") and isinstance(call.func, ast.Name):
            why = f"{name}() of a string runs it"
        if why:
            found.append(f"{filename}:{call.lineno}: {why}")
    return found


def _is_false(call: ast.Call, name: str) -> bool:
    value = _keyword(call, name)
    return isinstance(value, ast.Constant) and value.value is False


def _safe_loader(call: ast.Call, aliases: dict[str, str]) -> bool:
    loader = _keyword(call, "Loader") or (call.args[1] if len(call.args) > 1 else None)
    name = _dotted(loader, aliases) if loader is not None else None
    return name is not None and name.rsplit(".", 1)[-1] in SAFE_YAML_LOADERS


def _project_files() -> list[Path]:
    return sorted(p for top in SCANNED for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts)


def test_no_project_file_deserialises_by_running_code():
    files = _project_files()
    assert len(files) > 100  # the scan reaches the whole project
    found = [hit for path in files for hit in unsafe_calls(path.read_text(), str(path.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


@pytest.mark.parametrize(
    "code",
    [
        "import pickle\npickle.loads(b'')",
        "import pickle as p\np.load(open('f', 'rb'))",
        "from pickle import loads\nloads(b'')",
        "from pickle import Unpickler\nUnpickler(f).load()",
        "import dill\ndill.loads(b'')",
        "import marshal\nmarshal.loads(b'')",
        "import shelve\nshelve.open('db')",
        "import pandas as pd\npd.read_pickle('x')",
        "import torch\ntorch.load('x')",
        "import torch\ntorch.load('x', weights_only=False)",
        "import torch\ntorch.load('x', **kwargs)",
        "from torch import load\nload('x')",
        "import numpy as np\nnp.load('x', allow_pickle=True)",
        "import numpy as np\nnp.load('x', allow_pickle=flag)",
        "import yaml\nyaml.load(text)",
        "import yaml\nyaml.load(text, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(text)",
        "eval(text)",
        "exec(code)",
    ],
)
def test_the_scan_catches_each_unsafe_form(code):
    assert len(unsafe_calls(code)) == 1, code


@pytest.mark.parametrize(
    "code",
    [
        "import pickle\npickle.dumps(obj)",
        "import torch\ntorch.load('x', map_location='cpu', weights_only=True)",
        "import numpy as np\nnp.load('x')\nnp.load('y', allow_pickle=False)",
        "import yaml\nyaml.load(text, Loader=yaml.SafeLoader)\nyaml.safe_load(text)",
        "model.eval()\nself.exec(x)",
        "import json\njson.loads(text)",
    ],
)
def test_the_scan_passes_safe_forms(code):
    assert unsafe_calls(code) == []
