"""Small build configs for the tests that build a family: the TOML file a user would write,
made from keyword arguments, and the write-then-build steps that go with it.

Each test still states what its family is made of (data, base model, training, variants and their
parameters); this module holds only what they all repeated: the TOML syntax and the build call.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

# Three conv stages (8 → 16 → 16 channels, pooled twice): learns the tests' small image sets in a
# few epochs, and has two stage boundaries for early exits.
SMALL_CNN: Mapping[str, Any] = {"kind": "cnn", "stages": [
    {"channels": 8, "depth": 1, "pool": False},
    {"channels": 16, "depth": 1, "pool": True},
    {"channels": 16, "depth": 1, "pool": True},
]}


def variant(name: str, method: str | None = None, *, base: str | None = None,
            max_drop: float | None = None, **params: Any) -> dict[str, Any]:
    """One ``[[variants]]`` entry; ``method`` defaults to ``name``, and ``params`` become its
    ``[variants.params]`` table (left out when empty, as a hand-written config would)."""
    entry: dict[str, Any] = {"name": name, "method": method or name}
    if base is not None:
        entry["base"] = base
    if max_drop is not None:
        entry["max_drop"] = max_drop
    if params:
        entry["params"] = params
    return entry


def config_toml(*, data: str, family: str | None = None, seed: int | None = None,
                max_drop: float | None = None, arch: Mapping[str, Any] | None = None,
                model: str | None = None, model_args: Mapping[str, Any] | None = None,
                train: Mapping[str, Any] | None = None,
                variants: Sequence[Mapping[str, Any]] = ()) -> str:
    """The TOML text of a build config: ``data`` is ``[data] spec``; ``arch`` (a built-in network)
    or ``model`` and ``model_args`` (the user's factory), and ``train``, make up ``[base]``.

    A key left as None is not written at all, so the build's own default applies, exactly as when
    a user leaves it out.
    """
    top = {"family": family, "seed": seed, "max_drop": max_drop}
    base = {"model": model, "model_args": model_args, "arch": arch, "train": train}
    lines = _table([], {k: v for k, v in top.items() if v is not None})
    lines += _table(["data"], {"spec": data})
    lines += _table(["base"], {k: v for k, v in base.items() if v is not None})
    for v in variants:
        lines += _table(["variants"], v, array=True)
    return "\n".join(lines) + "\n"


def build_family(root: Path, toml: str, *, cache_dir: Path | None = None) -> Path:
    """Write ``toml`` to ``root/family.toml``, build it into ``root/family`` without a progress bar
    and return that directory. The base-model cache is ``root/cache`` unless a test shares one."""
    # imported here: a test that only writes a config (and builds it in a subprocess) need not
    # import torch for it
    from compression.build import build, load_config

    path = root / "family.toml"
    path.write_text(toml)
    return build(load_config(path), root / "family",
                 cache_dir=root / "cache" if cache_dir is None else cache_dir, progress=False)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Torch on one intra-op thread while a test builds: the tests' models are tiny, a second
    thread gains nothing, and on a shared 2-core host OpenMP's spinning threads made one build 4x
    slower (109 s against 26 s) when other jobs ran."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _table(path: list[str], table: Mapping[str, Any], *, array: bool = False) -> list[str]:
    """A table's lines: its header (none for the top level), its values, then its sub-tables
    (values must come first: in TOML a key after a sub-table's header belongs to the sub-table)."""
    lines = []
    if path:
        name = ".".join(_key(k) for k in path)
        lines += ["", f"[[{name}]]" if array else f"[{name}]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if not isinstance(v, Mapping)]
    for k, v in table.items():
        if isinstance(v, Mapping):
            lines += _table([*path, k], v)
    return lines


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _value(value: Any) -> str:
    """An inline TOML value. bool before int: True is an int to Python, ``true`` to TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # valid TOML for every int and float, inf and nan included
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, Sequence):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {value!r}")
