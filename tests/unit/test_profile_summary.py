"""bench/profile_summary.py reads py-spy's collapsed stacks: each line a stack and its samples."""

from __future__ import annotations

from pathlib import Path

from bench.profile_summary import summarise

STACKS = """\
main (a.py:1);run_forever (b.py:2);select (c.py:3) 6
main (a.py:1);run_forever (b.py:2);decode (d.py:4) 3
worker (e.py:5);wait (f.py:6) 11
"""


def test_shares_are_of_the_stacks_through_the_frame_asked_for(tmp_path: Path) -> None:
    path = tmp_path / "profile.txt"
    path.write_text(STACKS)
    loop = summarise(path, through="run_forever")
    assert loop.splitlines()[0].endswith("9 samples through 'run_forever'")
    assert " 66.7% select (c.py:3)" in loop and " 33.3% decode (d.py:4)" in loop
    assert "wait" not in loop  # the worker thread's stack does not pass through the loop
    everything = summarise(path)
    own, inclusive = everything.split("inclusive:")
    assert " 55.0% wait (f.py:6)" in own and " 30.0% select (c.py:3)" in own
    assert " 45.0% main (a.py:1)" in inclusive  # both loop stacks, counted once each


def test_a_profile_without_matching_samples_says_so(tmp_path: Path) -> None:
    path = tmp_path / "profile.txt"
    path.write_text(STACKS)
    assert summarise(path, through="nowhere").endswith("no samples through 'nowhere'")
