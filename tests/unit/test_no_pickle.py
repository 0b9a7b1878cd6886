"""Nothing in the product unpickles data: the code of compression/, server/ and client/ is scanned
for pickle-based loaders (pickle, dill, joblib, shelve, pandas.read_pickle, torch.load without
``weights_only=True``, numpy.load with ``allow_pickle=True``). The scanner is checked against code
that does each of these, so a scan that finds nothing is not a scan that cannot find anything."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("compression", "server", "client")

# Modules whose every loader unpickles: any call of these attributes is a finding.
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve"}
PICKLING_CALLS = {"load", "loads", "Unpickler", "open"}


def _true_keyword(call: ast.Call, name: str) -> bool | None:
    """The keyword's value when it is a literal, True/False; None when absent or not literal."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else None
    return None


def findings(source: str, filename: str = "<src>") -> list[str]:
    """Unpickling calls and imports in ``source``, as ``file:line: what``."""
    tree = ast.parse(source, filename)
    found: list[str] = []
    aliases: dict[str, str] = {}  # local name → module, for `import pickle as pk`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name] = a.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            for a in node.names:
                if root in PICKLING_MODULES and a.name in PICKLING_CALLS:
                    found.append(f"{filename}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attr = node.func.attr
        base = node.func.value
        module = aliases.get(base.id, base.id) if isinstance(base, ast.Name) else None
        where = f"{filename}:{node.lineno}"
        if module in PICKLING_MODULES and attr in PICKLING_CALLS:
            found.append(f"{where}: {module}.{attr}")
        elif module == "torch" and attr == "load" and _true_keyword(node, "weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        elif module in ("numpy", "np") and attr == "load" and \
                _true_keyword(node, "allow_pickle") is not False and any(
                    kw.arg == "allow_pickle" for kw in node.keywords):
            found.append(f"{where}: numpy.load with allow_pickle")
        elif attr == "read_pickle":
            found.append(f"{where}: read_pickle")
    return found


BAD = {
    "import pickle\npickle.load(open('m', 'rb'))\n": "pickle.load",
    "import pickle as pk\npk.loads(b'')\n": "pickle.loads",
    "from pickle import loads\n": "from pickle import loads",
    "import dill\ndill.load(f)\n": "dill.load",
    "import joblib\njoblib.load('m.joblib')\n": "joblib.load",
    "import torch\ntorch.load('m.pt')\n": "torch.load without",
    "import torch\ntorch.load('m.pt', weights_only=False)\n": "torch.load without",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)\n": "allow_pickle",
    "import pandas as pd\npd.read_pickle('f')\n": "read_pickle",
    "import shelve\nshelve.open('db')\n": "shelve.open",
}
GOOD = [
    "import torch\ntorch.load('m.pt', map_location='cpu', weights_only=True)\n",
    "import numpy as np\nnp.load('a.npz', allow_pickle=False)\nnp.load('b.npy')\n",
    "import json\njson.loads('{}')\n",
    "import pickle\npickle.dumps(1)\n",  # writing is not loading
]


@pytest.mark.parametrize(("source", "what"), BAD.items(), ids=list(BAD.values()))
def test_the_scanner_finds_each_unpickling_call(source: str, what: str) -> None:
    found = findings(source)
    assert found and what in found[0]


@pytest.mark.parametrize("source", GOOD)
def test_the_scanner_allows_safe_loaders(source: str) -> None:
    assert findings(source) == []


def test_no_code_unpickles() -> None:
    files = [f for room in ROOMS for f in sorted((ROOT / room).rglob("*.py"))
             if "generated" not in f.parts]
    assert len(files) > 20  # the rooms were found
    found = [hit for f in files
             for hit in findings(f.read_text(), str(f.relative_to(ROOT)))]
    assert found == []
