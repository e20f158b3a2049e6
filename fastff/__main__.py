"""Command line: `python -m fastff bench ...` and `python -m fastff train ...`."""

import argparse
import importlib
import sys
from typing import Any


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastff", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from . import bench

    bench.add_arguments(sub.add_parser("bench", help="time fastff against the dense FF"))
    train: Any = None
    train_error: ImportError | None = None
    try:
        train = importlib.import_module(".train", __package__)
    except ImportError as exc:  # offer the command anyway, and say why it cannot run
        train, train_error = None, exc
        sub.add_parser("train", help="train a model on a dataset (unavailable)", add_help=False)
    else:
        train.add_arguments(sub.add_parser("train", help="train a model on a dataset"))
    args, unknown = parser.parse_known_args(argv)
    if unknown and not (args.command == "train" and train is None):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench":
        return bench.main(args)
    if train is None:
        print(
            f"error: `train` cannot run: importing fastff.train failed: "
            f"{type(train_error).__name__}: {train_error}",
            file=sys.stderr,
        )
        return 2
    return train.main(args)


if __name__ == "__main__":
    sys.exit(main())
