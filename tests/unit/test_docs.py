"""bench/docs.py: the measured blocks of docs/ are rendered from recorded figures, and only
from them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.docs import BLOCK, TEXT, render

ROOT = Path(__file__).resolve().parents[2]
DOC = """# Title
Prose with 12 figures typed by hand stays.
<!-- measured fuzz: **{sent:,} requests**, RSS {growth_pct:+.1f} % on {machine}. -->
old text
<!-- /measured -->
<!-- measured-text demo -->
old screen
<!-- /measured -->
<!-- measured soak: {answered} answered -->
kept: no soak.json
<!-- /measured -->
"""


def test_blocks_are_rendered_from_the_recorded_json(tmp_path: Path) -> None:
    (tmp_path / "fuzz.json").write_text(json.dumps(
        {"sent": 10240, "growth_pct": 0.51,
         "host": {"cpus": 2, "machine": "x86_64", "system": "Linux 6.8", "load_average": [3.14]}}))
    (tmp_path / "demo.txt").write_text("budget  in budget\n5 ms    99 %\n")
    out, missing = render(DOC, tmp_path)
    assert "**10,240 requests**, RSS +0.5 % on 2-core x86_64, Linux 6.8, load average 3.1." in out
    assert "old text" not in out and "```\nbudget  in budget\n5 ms    99 %\n```" in out
    assert "kept: no soak.json" in out and missing == ["soak"]
    assert out.startswith("# Title\nProse with 12 figures typed by hand stays.\n")
    assert render(out, tmp_path)[0] == out  # idempotent


def test_a_template_that_does_not_fit_its_figures_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "fuzz.json").write_text(json.dumps({"sent": 1}))
    with pytest.raises(SystemExit, match=r"block 'fuzz'.*KeyError"):
        render(DOC, tmp_path)


def test_the_reliability_page_takes_its_figures_from_measurements() -> None:
    """Every run of tests and soak figures on docs/reliability.md sits in a measured block."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    keys = {m["key"] for m in BLOCK.finditer(doc)} | {m["key"] for m in TEXT.finditer(doc)}
    assert {"fuzz", "fuzz-attacks", "memory", "soak", "faults-raise", "faults-hang", "overload",
            "shutdown-SIGTERM", "drain-SIGTERM", "workers-heal", "metrics-endpoint", "scaleout",
            "container"} <= keys
