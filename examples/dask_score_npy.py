"""Score 1,000,000 rows from a memory-mapped .npy with fastff.dask on a local Dask cluster.

    python examples/dask_score_npy.py                       # 1e6 rows x 128, 2 workers
    python examples/dask_score_npy.py --quick               # CI-sized
    python examples/dask_score_npy.py --scheduler threads   # no cluster: dask's threads
    python examples/dask_score_npy.py --input rows.npy --output scores.npy

The input is a float32 .npy of shape (rows, width), written here in chunks if --input does not
exist (about 0.5 GB at the defaults: it never sits in memory whole). It is opened with
``numpy.load(mmap_mode="r")`` in the tasks, 65,536 rows each (a dask array of such blocks);
``fastff.dask.predict`` maps an UltraFFF(width, 16, depth 12) over the blocks, each block one
task, the layer shipped to each worker once. The scores stream back block by block into a
memory-mapped output .npy, so neither side ever holds all rows. Each worker runs one fastff
thread per worker thread. At the end, a random sample of rows is scored again by the layer
itself: the results must be bitwise equal. Prints rows per second.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def write_input(path, n_rows, width, seed=0, chunk=1 << 16):
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_rows, width))
    rng = np.random.default_rng(seed)
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        out[start:stop] = rng.standard_normal((stop - start, width), dtype=np.float32)
    out.flush()
    del out


def read_rows(path, start, stop):
    """Rows start..stop of a .npy, read on the worker that needs them."""
    return np.array(np.load(path, mmap_mode="r")[start:stop])


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--input", default=None, help="a float32 .npy (written if absent)")
    parser.add_argument("--output", default=None, help="where the scores go (.npy)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scheduler", choices=["cluster", "threads"], default="cluster")
    parser.add_argument("--quick", action="store_true", help="20,000 rows x 32 (CI)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.width, args.depth = 20_000, 32, 8
    try:
        import dask
        import dask.array as da

        import fastff.dask  # noqa: F401 - checks the extra is usable before writing data
    except ImportError as exc:
        print(f'skipped: needs dask ({exc}); pip install "fastff[dask]"')
        return 0

    workdir = tempfile.mkdtemp(prefix="fastff-dask-")  # files not named by the caller
    try:
        return score(args, workdir, dask, da)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def score(args, workdir, dask, da):
    import fastff.dask

    what = f"{args.rows} x {args.width} float32"
    source = args.input or os.path.join(workdir, "rows.npy")
    if not os.path.exists(source):
        t0 = time.perf_counter()
        write_input(source, args.rows, args.width)
        print(f"wrote {source}: {what} in {time.perf_counter() - t0:.1f} s")
    x = np.load(source, mmap_mode="r")  # the header, and the sample checked at the end
    if x.ndim != 2 or x.dtype != np.float32:
        raise SystemExit(
            f"{source} must hold a float32 (rows, width) array, got {x.dtype} {x.shape}"
        )
    layer = fastff.UltraFFF(x.shape[1], 16, args.depth, seed=0)
    # Each task reads its own block from the file: da.from_array(x) would put the whole
    # memory map into the graph, which a cluster pickles as one array of every row.
    edges = list(range(0, len(x), 1 << 16)) + [len(x)]
    dx = da.concatenate(
        [
            da.from_delayed(
                dask.delayed(read_rows)(source, a, b), shape=(b - a, x.shape[1]), dtype=x.dtype
            )
            for a, b in zip(edges[:-1], edges[1:])
        ]
    )
    y = fastff.dask.predict(layer, dx)
    target = args.output or os.path.join(workdir, "scores.npy")
    scores = np.lib.format.open_memmap(target, mode="w+", dtype=y.dtype, shape=y.shape)
    starts = np.concatenate([[0], np.cumsum(y.chunks[0])])
    blocks = y.to_delayed().ravel()

    t0 = time.perf_counter()
    if args.scheduler == "threads":
        with dask.config.set(scheduler="threads"):
            for i, block in enumerate(blocks):
                scores[starts[i] : starts[i + 1]] = block.compute()
    else:
        from distributed import Client, LocalCluster, as_completed

        with (
            LocalCluster(
                n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            Client(cluster) as client,
        ):
            t0 = time.perf_counter()  # the cluster's start-up is not scoring
            futures = client.compute(list(blocks))
            index = {f.key: i for i, f in enumerate(futures)}
            for future, block in as_completed(futures, with_results=True):
                i = index[future.key]
                scores[starts[i] : starts[i + 1]] = block
                future.release()
    seconds = time.perf_counter() - t0
    scores.flush()

    sample = np.sort(np.random.default_rng(1).choice(len(x), min(len(x), 2000), replace=False))
    same = bool(np.array_equal(scores[sample], layer(np.asarray(x[sample]))))
    where = (
        f"a LocalCluster of {args.workers} worker processes"
        if args.scheduler == "cluster"
        else "dask's threaded scheduler"
    )
    print(
        f"scored {len(x):,} rows of width {x.shape[1]} with UltraFFF(depth {args.depth}) on "
        f"{where} in {seconds:.2f} s: {len(x) / seconds:,.0f} rows/s; a sample of "
        f"{len(sample)} rows is bitwise equal to layer(x): {same}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": len(x), "seconds": seconds, "bitwise_equal": same}, f)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
