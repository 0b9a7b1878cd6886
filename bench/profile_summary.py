"""Where a server's time went, from py-spy's collapsed stacks (``py-spy record --format raw``,
as ``bench/gpu.py --profile`` writes them): the frames with the most samples of their own and in
total, optionally only in stacks that pass through a frame (``--through run_forever``: the event
loop's thread).

    python bench/profile_summary.py profile-cuda-b1.txt --through run_forever
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path


def summarise(path: Path, through: str | None = None, top: int = 25) -> str:
    """Own and inclusive sample shares per frame, the busiest first."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if through and not any(through in f for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"{path}: no samples{f' through {through!r}' if through else ''}"
    lines = [f"{path}: {total} samples{f' through {through!r}' if through else ''}", "own:"]
    lines += [f"  {100 * n / total:5.1f}% {f[:150]}" for f, n in own.most_common(top)]
    lines.append("inclusive:")
    lines += [f"  {100 * n / total:5.1f}% {f[:150]}" for f, n in inclusive.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    ap.add_argument("profiles", nargs="+", type=Path, help="py-spy raw (collapsed) files")
    ap.add_argument("--through", help="only stacks through a frame containing this text")
    ap.add_argument("--top", type=int, default=25, help="frames per list (default 25)")
    args = ap.parse_args()
    for path in args.profiles:
        print(summarise(path, args.through, args.top))


if __name__ == "__main__":
    main()
