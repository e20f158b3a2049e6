"""The accuracy-for-speed table of issue 23: Fashion-MNIST models at training width ~512.

Trains every configuration with ``python -m fastff train`` (a fresh process per run, its kernel
and BLAS threads set to ``--threads``; ``--jobs`` runs at a time), for each of ``--seeds``
seeds, then loads one trained model of each configuration back into this one process and times
its inference on the 10,000 test images, all models interleaved round by round (the median of
``--time-repeats`` rounds) at ``--time-threads`` threads, so the speedups over ``ff`` come from
one process on one machine state. Writes ``<out>.json`` (every run, its history and routing
diagnostics, and the timings), ``<out>.md`` (the table: test accuracy mean ± sample std over
the seeds, share of ff's accuracy, neurons per inference, dead leaves and routing entropy at the
end of training, inference time and speedup over ff) and, with matplotlib, ``<out>.png``
(accuracy against speedup).

Configurations (``--list`` prints them): ``ff-512`` (the reference) and the narrow dense
``ff-16``, ``ff-32``, ``ff-64``, which evaluate about as many neurons per image as the trees
(the fair peers at equal speed); ``fff-d{depth}x{leaf}`` for depth x leaf width 3x64, 4x32,
5x16, 6x8 (512 leaf neurons each), each plain, ``-bal<a>`` for each weight a
of ``--balancing`` (``--load-balancing a``; default 0.05 and 0.5), ``-master``
(``--master-leaf``: 512 + leaf width neurons) and ``-bal<a>-master``;
``ultra-d{depth}x{trees}`` for 8x1, 7x2, 6x4, 5x8 (504-511 neurons; 6x4 is train's default),
8x3 (1533, the default before) and twice the trees at the two shallowest depths, 6x8 and 5x16
(1016 and 1008), each plain and ``-bal<a>`` (UltraFFF's balancing over each tree's bottom
neurons). Every model uses
``python -m fastff train``'s defaults otherwise (20 epochs, Adam, cosine schedule; fff
hardening 4).

Resumable: a run whose result is already in ``<out>.json`` with the same command line is not
run again, so an interrupted sweep continues where it stopped (results are written after each
run); the timing and the table are redone at the end. Trained models and the runs' own JSON go
under ``--work`` (default results/sweep, not committed).

    python benchmarks/sweep.py --seeds 3 --jobs 2 --threads 1      # the issue's table
    python benchmarks/sweep.py --only 'ff-*' 'fff-d5x16*' --seeds 1 --epochs 1 --train-size 2000
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FFF_SHAPES = [(3, 64), (4, 32), (5, 16), (6, 8)]
ULTRA_SHAPES = [(8, 1), (7, 2), (6, 4), (5, 8), (8, 3), (6, 8), (5, 16)]
NARROW_WIDTHS = [16, 32, 64]  # dense layers as narrow as a tree's path: the fair speed peers


def configurations(balancing=(0.05, 0.5)) -> list[dict]:
    """Every configuration: name, model, the train arguments that make it, and its labels."""
    # ff-512 first: the reference for "of ff" and the speedups
    configs = [{"name": "ff-512", "model": "ff", "args": ["--width", "512"], "family": "ff"}]
    for width in NARROW_WIDTHS:
        configs.append(
            {
                "name": f"ff-{width}",
                "model": "ff",
                "args": ["--width", str(width)],
                "family": "ff narrow",
            }
        )
    for depth, leaf in FFF_SHAPES:
        for weight in (0.0, *balancing):
            for master in (False, True):
                name = f"fff-d{depth}x{leaf}" + (f"-bal{weight:g}" if weight else "")
                name += "-master" if master else ""
                args = ["--depth", str(depth), "--leaf-width", str(leaf)]
                if weight:
                    args += ["--load-balancing", repr(weight)]
                if master:
                    args.append("--master-leaf")
                family = "fff" + (f"+bal{weight:g}" if weight else "")
                family += "+master" if master else ""
                configs.append({"name": name, "model": "fff", "args": args, "family": family})
    for depth, trees in ULTRA_SHAPES:
        for weight in (0.0, *balancing):
            name = f"ultra-d{depth}x{trees}" + (f"-bal{weight:g}" if weight else "")
            args = ["--depth", str(depth), "--parallel-size", str(trees)]
            if weight:
                args += ["--load-balancing", repr(weight)]
            family = "ultra" + (f"+bal{weight:g}" if weight else "")
            configs.append({"name": name, "model": "ultra", "args": args, "family": family})
    return configs


# ---- training runs ---------------------------------------------------------------------------


def run_command(config: dict, seed: int, options) -> list[str]:
    """The train arguments of one run (without the output paths, which do not change it)."""
    command = ["--model", config["model"], *config["args"], "--seed", str(seed)]
    command += ["--threads", str(options.threads), "--half", "none", "--inference-repeats", "1"]
    for flag, value in (
        ("--epochs", options.epochs),
        ("--train-size", options.train_size),
        ("--val-size", options.val_size),
        ("--data", options.data),
    ):
        if value is not None:
            command += [flag, str(value)]
    return command


def run_one(config: dict, seed: int, options) -> dict:
    """Train one model in a fresh process; -> the summary kept in the sweep's JSON."""
    work = Path(options.work)
    stem = f"{config['name']}-s{seed}"
    result_path, model_path = work / "runs" / f"{stem}.json", work / "models" / f"{stem}.npz"
    result_path.parent.mkdir(parents=True, exist_ok=True)
    command = run_command(config, seed, options)
    argv = [sys.executable, "-m", "fastff", "train", *command, "--no-progress"]
    argv += ["--json", str(result_path), "--save", str(model_path)]
    threads = str(options.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads)
    env["MKL_NUM_THREADS"] = threads
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {"command": command, "error": (proc.stderr or proc.stdout)[-2000:], "wall": wall}
    result = json.loads(result_path.read_text())
    last = result["history"][-1]
    history = []  # per epoch, the routing's scalars (the last epoch's histograms are kept)
    for record in result["history"]:
        record = dict(record)
        routing = record.pop("routing", None)
        if routing is not None:
            record.update(
                {k: v for k, v in routing.items() if not isinstance(v, list) and k != "rows"}
            )
        history.append(record)
    return {
        "command": command,
        "config": config["name"],
        "seed": seed,
        "test_accuracy": result["test_accuracy"],
        "val_accuracy": result["val_accuracy"],
        "neurons_per_inference": result["neurons_per_inference"],
        "training_width": result["training_width"],
        "params": result["params"],
        "train_seconds": result["train_seconds"],
        "wall_seconds": wall,
        "normalisation": result["config"]["normalisation"],
        "model_path": str(model_path),
        "final_routing": last.get("routing"),
        "history": history,
    }


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def train_all(configs, options, results: dict, json_path: Path) -> list[str]:
    """Runs every (configuration, seed) not already in results; returns the failures."""
    todo = []
    for config in configs:
        for seed in range(options.seeds):
            key = f"{config['name']}/seed{seed}"
            done = results["runs"].get(key)
            if (
                done
                and "error" not in done
                and done["command"] == run_command(config, seed, options)
            ):
                continue
            todo.append((key, config, seed))
    print(
        f"{len(todo)} runs to do, {len(configs) * options.seeds - len(todo)} already done",
        flush=True,
    )
    failures, lock, started = [], threading.Lock(), time.perf_counter()
    with ThreadPoolExecutor(max_workers=options.jobs) as pool:
        futures = {pool.submit(run_one, config, seed, options): key for key, config, seed in todo}
        for n_done, future in enumerate(as_completed(futures), 1):
            key, summary = futures[future], future.result()
            with lock:
                results["runs"][key] = summary
                write_json(json_path, results)
            elapsed = time.perf_counter() - started
            eta = elapsed / n_done * (len(todo) - n_done)
            if "error" in summary:
                failures.append(key)
                print(f"[{n_done}/{len(todo)}] {key}: FAILED\n{summary['error']}", flush=True)
            else:
                print(
                    f"[{n_done}/{len(todo)}] {key}: test {summary['test_accuracy']:.4f} "
                    f"({summary['train_seconds']:.0f} s training; about {eta / 60:.0f} min left)",
                    flush=True,
                )
    return failures


# ---- inference timing, in this process ---------------------------------------------------------


def time_models(configs, options, results: dict) -> dict:
    """Median and min seconds of model(x_test) per configuration, models interleaved."""
    import fastff
    from fastff.data import load_fashion_mnist

    models, inputs = {}, {}
    (_, _), (x_test, _) = load_fashion_mnist(options.data)
    x_test = x_test.reshape(len(x_test), -1).astype(np.float32)
    for config in configs:
        runs = [results["runs"].get(f"{config['name']}/seed{s}") for s in range(options.seeds)]
        run = next((r for r in runs if r and "error" not in r), None)
        if run is None or not Path(run["model_path"]).exists():
            continue
        models[config["name"]] = fastff.load(run["model_path"])
        norm = run["normalisation"]
        inputs[config["name"]] = ((x_test - norm["mean"]) / norm["std"]).astype(np.float32)
    times: dict[str, list[float]] = {name: [] for name in models}
    order = list(models)
    rng = np.random.default_rng(0)
    limits = _blas_limits(options.time_threads)
    try:
        with fastff.num_threads(options.time_threads):
            for name in order:  # warm-up
                models[name](inputs[name])
            for _ in range(options.time_repeats):
                rng.shuffle(order)
                for name in order:
                    start = time.perf_counter()
                    models[name](inputs[name])
                    times[name].append(time.perf_counter() - start)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    return {
        name: {"median": statistics.median(t), "min": min(t), "rows": int(len(x_test))}
        for name, t in times.items()
    }


def _blas_limits(threads):
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(threads, user_api="blas")


# ---- table and figure ------------------------------------------------------------------------


def summarise(configs, options, results: dict) -> list[dict]:
    """One row per configuration with at least one finished run."""
    rows = []
    timing = results.get("timing", {})
    ff_time = next(
        (
            timing[c["name"]]["median"]
            for c in configs
            if c["model"] == "ff" and c["name"] in timing
        ),
        None,
    )
    ff_acc = None
    for config in configs:
        runs = [results["runs"].get(f"{config['name']}/seed{s}") for s in range(options.seeds)]
        runs = [r for r in runs if r and "error" not in r]
        if not runs:
            continue
        acc = [r["test_accuracy"] for r in runs]
        routing = [r["final_routing"] for r in runs if r.get("final_routing")]
        row = {
            "config": config["name"],
            "family": config["family"],
            "seeds": len(runs),
            "accuracy_mean": statistics.fmean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else None,
            "neurons_per_inference": runs[0]["neurons_per_inference"],
            "training_width": runs[0]["training_width"],
            "dead_leaf_fraction": statistics.fmean(r["dead_leaf_fraction"] for r in routing)
            if routing
            else None,
            "routing_entropy": statistics.fmean(r["routing_entropy"] for r in routing)
            if routing
            else None,
            "max_routing_entropy": routing[0]["max_routing_entropy"] if routing else None,
            "inference_seconds": timing.get(config["name"], {}).get("median"),
        }
        if config["model"] == "ff":
            ff_acc = ff_acc if ff_acc is not None else row["accuracy_mean"]
        rows.append(row)
    for row in rows:
        row["of_ff"] = row["accuracy_mean"] / ff_acc if ff_acc else None
        t = row["inference_seconds"]
        row["speedup"] = ff_time / t if (ff_time and t) else None
    return rows


def markdown(rows: list[dict], options, results: dict) -> str:
    env = results["environment"]
    timing_rows = next(iter(results.get("timing", {}).values()), {}).get("rows", 10000)
    lines = [
        "# Fashion-MNIST: accuracy for speed (issue 23)",
        "",
        f"Made by `{results['command']}` on {env['machine']} ({env['cpu_count']} CPUs, "
        f"Python {env['python']}, NumPy {env['numpy']}, fastff {env['fastff']}), "
        f"{time.strftime('%Y-%m-%d', time.localtime(results['finished']))}. "
        f"Each configuration trained with `python -m fastff train`'s recipe "
        f"({options.epochs or 20} epochs"
        + (f", {options.train_size} training images" if options.train_size else "")
        + f") for {options.seeds} seed(s) at {options.threads} thread(s) per run; test accuracy "
        "is the mean ± sample standard deviation over the seeds. Inference: the first seed's "
        f"model on the {timing_rows:,} test images at {options.time_threads} thread(s), median "
        f"of {options.time_repeats} interleaved rounds in one process; speedup over ff-512.",
        "",
        "| configuration | neurons / inference | training width | test accuracy | of ff | "
        "dead leaves | routing entropy (bits) | inference (ms) | speedup over ff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec, scale=1.0, suffix=""):
        return "–" if value is None else f"{value * scale:{spec}}{suffix}"

    for row in rows:
        acc = f"{100 * row['accuracy_mean']:.2f}%"
        acc += f" ± {100 * row['accuracy_std']:.2f}" if row["accuracy_std"] is not None else ""
        acc += f" (n={row['seeds']})"
        entropy = fmt(row["routing_entropy"], ".2f")
        if row["max_routing_entropy"] is not None:
            entropy += f" / {row['max_routing_entropy']:.0f}"
        lines.append(
            f"| {row['config']} | {row['neurons_per_inference']} | {row['training_width']} | "
            f"{acc} | {fmt(row['of_ff'], '.1f', 100, '%')} | "
            f"{fmt(row['dead_leaf_fraction'], '.1f', 100, '%')} | {entropy} | "
            f"{fmt(row['inference_seconds'], '.2f', 1e3)} | {fmt(row['speedup'], '.1f', 1, 'x')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> bool:
    """Accuracy against speedup over ff; False where matplotlib is missing."""
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ff = next((r for r in rows if r["family"] == "ff"), None)
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = plt.get_cmap("tab20").colors  # more families than the default cycle's 10
    markers = {"ff": "s", "fff": "o", "ultra": "^"}  # the model kind, by the family's stem
    for k, family in enumerate(families):
        pts = [r for r in rows if r["family"] == family and r["speedup"]]
        if not pts:
            continue
        ax.errorbar(
            [r["speedup"] for r in pts],
            [100 * r["accuracy_mean"] for r in pts],
            yerr=[100 * (r["accuracy_std"] or 0) for r in pts],
            fmt=markers.get(family.split()[0].split("+")[0], "o"),
            color=colours[k % len(colours)],
            capsize=3,
            label=family,
        )
        for r in pts:
            ax.annotate(
                r["config"].split("-", 1)[-1],
                (r["speedup"], 100 * r["accuracy_mean"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    if ff is not None:
        ax.axhline(100 * ff["accuracy_mean"], color="grey", lw=0.8)
        ax.axhline(99 * ff["accuracy_mean"], color="grey", lw=0.8, ls="--", label="99% of ff")
    ax.set_xscale("log")
    ticks = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}x")
    ax.xaxis.set_major_formatter(ticks)
    ax.xaxis.set_minor_formatter(ticks)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("inference speedup over ff-512 (same process, same threads)")
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    ax.set_title("Fashion-MNIST: accuracy for speed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ---- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = "\n".join(__doc__.splitlines()[1:])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at a time")
    parser.add_argument("--threads", type=int, default=1, help="threads per training process")
    parser.add_argument("--epochs", type=int, default=None, help="default: train's (20)")
    parser.add_argument("--train-size", type=int, default=None, help="first N training images")
    parser.add_argument("--val-size", type=int, default=None, help="default: train's (5000)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST folder (train's default)")
    parser.add_argument(
        "--balancing",
        type=float,
        nargs="+",
        default=[0.05, 0.5],
        help="the -bal<a> configurations' load-balancing weights (default 0.05 0.5)",
    )
    parser.add_argument("--only", nargs="+", default=None, help="configuration name patterns")
    parser.add_argument("--out", default="docs/learning-quality", help="writes .json .md .png")
    parser.add_argument("--work", default="results/sweep", help="run outputs and models")
    parser.add_argument("--time-threads", type=int, default=1)
    parser.add_argument("--time-repeats", type=int, default=7)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    options = parser.parse_args(argv)
    for name in ("seeds", "jobs", "threads", "time_threads", "time_repeats"):
        if getattr(options, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not all(0 < a < float("inf") for a in options.balancing):
        parser.error("--balancing weights must be finite numbers > 0")
    configs = configurations(options.balancing)
    if options.only:
        configs = [c for c in configs if any(fnmatch.fnmatch(c["name"], p) for p in options.only)]
        if not configs:
            parser.error(f"no configuration matches {options.only}")
    if options.list:
        for c in configs:
            print(f"{c['name']:24s} --model {c['model']} {' '.join(c['args'])}")
        return 0

    import fastff

    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path = out.with_suffix(".json")
    results = json.loads(json_path.read_text()) if json_path.exists() else {"runs": {}}
    results["command"] = "python benchmarks/sweep.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    results["environment"] = {
        "fastff": fastff.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    failures = train_all(configs, options, results, json_path)
    if not options.skip_timing:
        print("timing inference in this process ...", flush=True)
        results["timing"] = time_models(configs, options, results)
    results["finished"] = time.time()
    rows = summarise(configs, options, results)
    results["table"] = rows
    write_json(json_path, results)
    table = markdown(rows, options, results)
    out.with_suffix(".md").write_text(table)
    print(table)
    figure = out.with_suffix(".png")
    if not rows:
        figure_note = " (no finished run: no figure)"
    elif plot(rows, figure):
        figure_note = f", {figure}"
    else:
        figure_note = " (matplotlib is not installed: no figure)"
    print(f"wrote {json_path}, {out.with_suffix('.md')}{figure_note}")
    if failures:
        print(f"{len(failures)} runs failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
