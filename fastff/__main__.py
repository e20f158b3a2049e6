"""Command line: `python -m fastff bench ...` (and `train`, once available)."""

import argparse
import importlib
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="time fastff against the dense FF"))
    try:  # the training command ships with fastff.train, when that module exists
        train = importlib.import_module(".train", __package__)
    except ImportError:
        train = None
    if train is not None:
        train.add_arguments(sub.add_parser("train", help="train a model on a dataset"))
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench.main(args)
    assert train is not None  # argparse offers "train" only when the module exists
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
