"""Command line: `python -m fastff bench ...` (and `train`, once available)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="time fastff against the dense FF"))
    try:
        from . import train
    except ImportError:
        train = None
    if train is not None:
        train.add_arguments(sub.add_parser("train", help="train a model on a dataset"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
