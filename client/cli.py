"""The ``adaptive-inference`` command. Each subcommand parses its flags here and calls into its
room (``compression`` for build/inspect, ``server`` for serve, ``client`` for infer/bench/demo),
importing it lazily so ``--help`` stays fast. User mistakes exit 2 with one line, no traceback."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

Handler = Callable[[argparse.Namespace], int]


def _build(args: argparse.Namespace) -> int:
    from compression import report
    from compression.build import build, load_config
    from compression.family import load_family

    cfg = load_config(args.config, data_spec=args.data, seed=args.seed)
    out = build(cfg, args.out, base_checkpoint=args.base_checkpoint, cache_dir=args.cache_dir,
                progress=not args.no_progress)
    family = load_family(out)
    print(report.table(list(family.variants.values())))
    print(f"\nfamily {family.name!r} written to {out} ({family.manifest['build']['seconds']:.0f} s); "
          f"report: {out / 'report.md'}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from compression import report
    from compression.family import load_family

    family = load_family(args.family)
    print(f"family {family.name!r}: {len(family.variants)} variants, input "
          f"{family.manifest['input']['shape']}, dataset {family.manifest['dataset']['spec']!r}")
    print(report.table(list(family.variants.values())))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptive-inference",
                                description="Build and serve an adaptive model family.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("build", help="train and compress a model family from a TOML config")
    b.add_argument("config", help="TOML family config, e.g. configs/mnist5k.toml")
    b.add_argument("--out", required=True, help="family directory to write")
    b.add_argument("--data", help="dataset spec overriding the config: mnist5k, idx:DIR, npz:FILE")
    b.add_argument("--seed", type=int, help="seed overriding the config")
    b.add_argument("--base-checkpoint", help="your trained base model (safetensors or state_dict)")
    b.add_argument("--cache-dir", help="where trained base models are cached "
                   "(default $ADAPTIVE_CACHE or ~/.cache/adaptive-inference)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(handler=_build)

    i = sub.add_parser("inspect", help="print a family's variant table from its manifest")
    i.add_argument("family", help="family directory")
    i.set_defaults(handler=_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from compression.errors import BuildError

    try:
        return int(args.handler(args))
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
