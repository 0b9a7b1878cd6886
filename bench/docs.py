"""Fill the measured blocks of docs/*.md from what the tests and benchmarks recorded.

No figure in docs/ is typed by hand: each sits in a block

    <!-- measured KEY: TEMPLATE -->
    (rendered text, replaced on every run)
    <!-- /measured -->

where TEMPLATE is a Python format string over ``results/measured/KEY.json`` — written by a test
through the ``record`` fixture (tests/conftest.py) or by a benchmark — plus ``{machine}``, the
host it was measured on. ``<!-- measured-text KEY -->`` blocks take ``results/measured/KEY.txt``
verbatim, fenced (the demo's final screen); ``<!-- measured-md KEY -->`` blocks take
``results/measured/KEY.md`` as markdown (a benchmark's table). A block whose file is missing
is left as it is and named on stderr. ``make docs`` runs the tests that record and then this script.

    python bench/docs.py [--measured results/measured] [docs/*.md]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MEASURED = ROOT / "results" / "measured"

BLOCK = re.compile(r"(?P<open><!-- measured (?P<key>[\w.-]+): (?P<template>.*?) -->\n)"
                   r"(?P<body>.*?)(?P<close><!-- /measured -->)", re.DOTALL)
TEXT = re.compile(r"(?P<open><!-- measured-(?P<kind>text|md) (?P<key>[\w.-]+) -->\n)"
                  r"(?P<body>.*?)(?P<close><!-- /measured -->)", re.DOTALL)


def machine(host: dict[str, Any] | None) -> str:
    """'2-core x86_64, Linux 6.8, load 3.1' from a `client.results.host_info` dict."""
    if not host:
        return "machine not recorded"
    load = host.get("load_average") or host.get("load_average_end") or []
    text = f"{host.get('cpus', '?')}-core {host.get('machine', '?')}, {host.get('system', '?')}"
    return f"{text}, load average {load[0]:.1f}" if load else text


def render(doc: str, measured: Path) -> tuple[str, list[str]]:
    """``doc`` with every block whose measurement exists re-rendered; and the keys missing."""
    missing: list[str] = []

    def fill(m: re.Match[str]) -> str:
        path = measured / f"{m['key']}.json"
        if not path.exists():
            missing.append(m["key"])
            return m[0]
        data = json.loads(path.read_text())
        try:
            body = m["template"].format(**data, machine=machine(data.get("host")))
        except (KeyError, IndexError, ValueError) as exc:
            raise SystemExit(f"error: block {m['key']!r}: template {m['template']!r} does not fit "
                             f"{path}: {type(exc).__name__}: {exc}") from None
        return f"{m['open']}{body.strip()}\n{m['close']}"

    def fill_text(m: re.Match[str]) -> str:
        path = measured / f"{m['key']}.{'txt' if m['kind'] == 'text' else 'md'}"
        if not path.exists():
            missing.append(m["key"])
            return m[0]
        text = path.read_text().rstrip()
        if m["kind"] == "text":
            text = f"```\n{text}\n```"
        return f"{m['open']}{text}\n{m['close']}"

    return TEXT.sub(fill_text, BLOCK.sub(fill, doc)), missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("docs", nargs="*", type=Path, default=sorted((ROOT / "docs").glob("*.md")))
    ap.add_argument("--measured", type=Path, default=MEASURED)
    args = ap.parse_args(argv)
    stale = 0
    for path in args.docs:
        text = path.read_text()
        new, missing = render(text, args.measured)
        if new != text:
            path.write_text(new)
            print(f"{path}: updated")
        for key in missing:
            stale += 1
            print(f"{path}: no measurement {key!r} in {args.measured} (block left as it was)",
                  file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
