"""`python -m fastff train`: NumPy minibatch training on Fashion-MNIST with fastff.nn + optim.

Models (all map a flattened 28x28 image to 10 logits):
  ff     the dense baseline: Linear(784, width) -> ReLU -> Linear(width, 10)
  ultra  fastff.UltraFFF(784, 10, depth, parallel_size): per row and tree only the depth+1
         neurons of one root-to-leaf path are evaluated (--load-balancing: weight of
         the usage-balancing term over each tree's bottom neurons)
  fff    fastff.FFF(784, leaf_width, 10, depth): depth routers pick one leaf MLP per row
         (--load-balancing: weight of the leaf-usage balancing term; --master-leaf: one more
         leaf every row evaluates, mixed in by a learned share)

After each epoch the tree models also report where inference routes the validation images
(layer.routing_stats): dead leaves (no image reaches them) and the routing entropy in bits (at
most depth); the JSON history keeps the leaf and node histograms.

The last --val-size training images are held out for per-epoch validation; the test set is
used once at the end, for accuracy and for timing the model's inference path, model(x_test).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__, get_num_threads, nn, num_threads, optim
from ._validation import max_threads, output_file_problem
from .data import DatasetError, load_fashion_mnist
from .layers import UltraFFF

N_PIXELS, N_CLASSES = 28 * 28, 10

# Per-model defaults, used where the command line leaves an option out; in float32 on one
# thread each run takes 10 s to 2 minutes on this 2-core machine. All train 20 epochs, so the ff
# baseline gets the same budget. Chosen from sweeps (test accuracy; 1 thread; ff: 0.8965):
# - ultra: depth 6 x 4 trees (508 neurons, 28 per image). In the 3-seed sweep of
#   benchmarks/sweep.py (docs/learning-quality.md) it beat the earlier default, depth 8 x 3
#   (1533 neurons, 27 per image), on accuracy (87.64% +- 0.36 against 87.25% +- 0.19) and on
#   speed (3.5x ff against 2.9x) with a third of the weights. Shallower trees with more of
#   them are more accurate and slower (5 x 8: 88.28%, 2.0x; 5 x 16: 88.78%, 0.9x); deeper
#   ones the reverse (8 x 1: 84.90%, 9.2x). Load balancing moved accuracy by -0.22 to +0.39
#   points over the shapes at weight 0.05 and cost 0.3-1.6 at 0.5, so it stays off. Bigger
#   learning rates and longer schedules were worse.
# - fff (fastff.FFF; hardening weighs the mean router-decision entropy): among trees of
#   training width 512 (2**depth leaves x leaf width), depth 5 with 16-neuron leaves and
#   hardening 4 reaches 0.8805, 0.8720 and 0.8703 (seeds 0-2, docs/learning-quality.md)
#   evaluating 21 of 512 neurons (4%) per image; depth 4 x 32 is 0.76 points more accurate on
#   the mean but evaluates 36 neurons and runs about 1.5x slower; depth 6 x 8 (14 neurons) loses
#   1.7 points. In an earlier sweep stronger hardening helped every shape (depth 5 x 16: 0.849
#   at 0.5, 0.869 at 1, 0.878 at 2, 0.879 at 4): hard inference punishes routing left soft.
#   Later probes of this recipe (seed 0, where it reaches 0.8805) found nothing better:
#   hardening 8 0.8699, dropout 0.2 0.8723, AdamW weight decay 0.05 0.8777, region leak 0.1
#   0.8769, learning rate 2e-3 0.8800, 40 epochs 0.8811, distillation from the ff (soft
#   targets at temperature 4, weight 0.9) 0.8675, GELU leaves 0.8766, hardening ramped up over
#   the first half 0.8719, batches of 64 0.8765. Load balancing and the master leaf: see
#   docs/learning-quality.md.
# The training recipe all three models share, so the comparison differs only in the layer.
TRAINING_DEFAULTS = dict(
    epochs=20,
    batch_size=128,
    optimizer="adam",
    lr=1e-3,
    weight_decay=0.0,
    schedule="cosine",
    warmup_steps=0,
)
DEFAULTS = {
    "ff": dict(width=512, **TRAINING_DEFAULTS),
    "ultra": dict(
        depth=6, parallel_size=4, activation="gelu", load_balancing=0.0, **TRAINING_DEFAULTS
    ),
    "fff": dict(
        depth=5,
        leaf_width=16,
        activation="relu",
        dropout=0.0,
        region_leak=0.0,
        hardening=4.0,
        load_balancing=0.0,
        master_leaf=False,
        **TRAINING_DEFAULTS,
    ),
}
MODEL_OPTIONS = {  # options that only make sense for some models
    "width": {"ff"},
    "depth": {"ultra", "fff"},
    "parallel_size": {"ultra"},
    "leaf_width": {"fff"},
    "activation": {"ultra", "fff"},
    "dropout": {"fff"},
    "region_leak": {"fff"},
    "hardening": {"fff"},
    "load_balancing": {"fff", "ultra"},
    "master_leaf": {"fff"},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "defaults:\n" + "\n".join(
        f"  {model:6s} " + ", ".join(f"{k}={v}" for k, v in values.items())
        for model, values in DEFAULTS.items()
    )
    parser.add_argument("--dataset", choices=["fashion-mnist"], default="fashion-mnist")
    parser.add_argument("--model", choices=sorted(DEFAULTS), required=True)
    parser.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder holding the IDX files (default: $FASTFF_DATA/fashion-mnist,"
        " else /usr/share/datasets/fashion-mnist)",
    )
    arch = parser.add_argument_group("architecture (defaults depend on --model)")
    arch.add_argument("--width", type=int, help="ff: hidden width (512)")
    arch.add_argument("--depth", type=int, help="ultra, fff: tree depth")
    arch.add_argument("--parallel-size", type=int, help="ultra: number of trees")
    arch.add_argument("--leaf-width", type=int, help="fff: neurons per leaf")
    arch.add_argument(
        "--activation", choices=["relu", "gelu", "identity"], help="ultra, fff: neuron activation"
    )
    arch.add_argument("--dropout", type=float, help="fff: dropout on leaf activations")
    arch.add_argument("--region-leak", type=float, help="fff: probability of a swapped decision")
    arch.add_argument(
        "--hardening", type=float, help="fff: weight of the node-entropy hardening loss"
    )
    arch.add_argument(
        "--load-balancing",
        type=float,
        help="fff, ultra: weight of the leaf-usage balancing loss (forward_train's load_balancing)",
    )
    arch.add_argument(
        "--master-leaf",
        action="store_true",
        default=None,
        help="fff: add a master leaf every image evaluates (FFF(master_leaf=True))",
    )
    run = parser.add_argument_group("training")
    run.add_argument("--epochs", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    run.add_argument("--lr", type=float, help="learning rate (the peak of the schedule)")
    run.add_argument("--weight-decay", type=float)
    run.add_argument(
        "--schedule",
        choices=["constant", "step", "cosine", "onecycle"],
        help="step: x0.1 after each third of training; cosine: with "
        "--warmup-steps; onecycle: cramming's triangle",
    )
    run.add_argument("--warmup-steps", type=int, help="cosine: linear warm-up steps")
    run.add_argument(
        "--val-size",
        type=int,
        default=5000,
        help="training images held out for validation (default 5000)",
    )
    run.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on only the first N training images (after holding out --val-size); "
        "for quick runs",
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads of fastff's kernels and of BLAS, for training and the inference timing "
        "alike (default: fastff.get_num_threads(), i.e. OMP_NUM_THREADS or all available CPUs)",
    )
    run.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    run.add_argument(
        "--half",
        choices=["bfloat16", "float16", "none"],
        default="bfloat16",
        help="after training, also evaluate and time the model converted to this "
        "half-precision storage (model.astype); default bfloat16",
    )
    run.add_argument(
        "--inference-repeats",
        type=int,
        default=5,
        help="timed runs over the test set; the median is reported",
    )
    run.add_argument("--json", type=Path, default=None, help="write the results here")
    run.add_argument(
        "--save",
        type=Path,
        default=None,
        help="save the trained model here (fastff.save: .npz or .safetensors)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


class UsageError(ValueError):
    """A bad combination of command-line options."""


def resolve_options(args) -> dict:
    """The run's options: the command line where given, else the model's defaults."""
    options = dict(vars(args))
    for option, models in MODEL_OPTIONS.items():
        if options.get(option) is not None and args.model not in models:
            flag = "--" + option.replace("_", "-")
            raise UsageError(
                f"{flag} applies to --model {'/'.join(sorted(models))}, not {args.model}"
            )
    for option, value in DEFAULTS[args.model].items():
        if options.get(option) is None:
            options[option] = value
    if options["threads"] is None:
        options["threads"] = get_num_threads()
    for name in ("epochs", "batch_size", "threads", "inference_repeats", "val_size"):
        if options[name] < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {options[name]}")
    if options["threads"] > max_threads():
        raise UsageError(
            f"--threads must be <= {max_threads()} (8 per CPU, at least 64), "
            f"got {options['threads']}"
        )
    if options.get("train_size") is not None and options["train_size"] < 1:
        raise UsageError(f"--train-size must be >= 1, got {options['train_size']}")
    for name in ("hardening", "load_balancing", "lr", "weight_decay", "dropout", "region_leak"):
        value = options.get(name)
        if value is not None and not (0 <= value < float("inf")):
            raise UsageError(
                f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}"
            )
    if options["warmup_steps"] < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {options['warmup_steps']}")
    for name in ("json", "save"):
        if options.get(name) is not None:
            problem = output_file_problem(options[name], "--" + name)
            if problem:
                raise UsageError(problem)
    return options


# ---- data ----------------------------------------------------------------------------------


def prepare_data(options, dtype):
    """Flattened, standardised images: (x_train, y_train), (x_val, y_val), (x_test, y_test),
    normalisation. Mean and std are those of the training part only."""
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist(options["data"])
    n_val = options["val_size"]
    if n_val >= len(x_train):
        raise UsageError(
            f"--val-size {n_val} leaves no training images (the training set has {len(x_train)})"
        )
    x_train = x_train.reshape(len(x_train), N_PIXELS)
    x_test = x_test.reshape(len(x_test), N_PIXELS)
    fit = x_train[:-n_val]
    y_fit = y_train[:-n_val]
    if options.get("train_size") is not None:
        fit, y_fit = fit[: options["train_size"]], y_fit[: options["train_size"]]
    mean, std = float(fit.mean()), float(fit.std()) or 1.0

    def standardise(images):
        return ((images.astype(dtype) - dtype.type(mean)) / dtype.type(std)).astype(dtype)

    return (
        (standardise(fit), y_fit),
        (standardise(x_train[-n_val:]), y_train[-n_val:]),
        (standardise(x_test), y_test),
        {"mean": mean, "std": std},
    )


# ---- models --------------------------------------------------------------------------------


def build_model(options, dtype):
    """-> (model, keyword options for forward_train, neurons per inference, training width).

    Neurons per inference counts the neurons one row evaluates (the ff's whole hidden layer;
    the ultra's path nodes; the fff's routers plus one leaf); training width counts the hidden
    neurons the model trains."""
    seed = options["seed"]
    if options["model"] == "ff":
        width = options["width"]
        model = nn.Sequential(
            nn.Linear(N_PIXELS, width, dtype=dtype, seed=seed),
            nn.ReLU(),
            nn.Linear(width, N_CLASSES, dtype=dtype, seed=seed + 1),
        )
        return model, {}, width, width
    if options["model"] == "ultra":
        tree = UltraFFF(
            N_PIXELS,
            N_CLASSES,
            options["depth"],
            options["parallel_size"],
            options["activation"],
            dtype=dtype,
            seed=seed,
        )
        ultra_kw = {}
        if options["load_balancing"]:  # left out at 0: the call is then the one before the option
            ultra_kw["load_balancing"] = options["load_balancing"]
        return tree, ultra_kw, tree.neurons_per_inference, tree.training_width
    import fastff

    if not hasattr(fastff, "FFF"):
        raise UsageError(
            "--model fff needs fastff.FFF, which this build of fastff does not "
            "have yet (it is being developed on the fff branch)"
        )
    depth, leaf_width = options["depth"], options["leaf_width"]
    layer = fastff.FFF(
        N_PIXELS,
        leaf_width,
        N_CLASSES,
        depth,
        activation=options["activation"],
        dropout=options["dropout"],
        region_leak=options["region_leak"],
        master_leaf=options["master_leaf"],
        dtype=dtype,
        seed=seed,
    )
    train_kw = {"rng": np.random.default_rng(seed + 1), "hardening": options["hardening"]}
    if options["load_balancing"]:  # left out at 0: the call is then the one before the option
        train_kw["load_balancing"] = options["load_balancing"]
    neurons = getattr(layer, "neurons_per_inference", depth + leaf_width)
    width = getattr(layer, "training_width", 2**depth * leaf_width)
    return layer, train_kw, neurons, width


def build_optimizer(model, options, steps_per_epoch):
    kind, lr, wd = options["optimizer"], options["lr"], options["weight_decay"]
    opt: optim.Optimizer
    if kind == "sgd":
        opt = optim.SGD(model, lr, momentum=0.9, nesterov=True, weight_decay=wd)
    elif kind == "adam":
        opt = optim.Adam(model, lr, weight_decay=wd)
    else:
        opt = optim.AdamW(model, lr, weight_decay=wd)
    total = options["epochs"] * steps_per_epoch
    schedule = options["schedule"]
    sched: optim.LRSchedule | None
    if schedule == "cosine":
        sched = optim.CosineLR(opt, total, warmup_steps=options["warmup_steps"])
    elif schedule == "onecycle":
        sched = optim.OneCycleLR(opt, total)
    elif schedule == "step":
        sched = optim.StepLR(opt, max(1, -(-total // 3)), gamma=0.1)
    else:
        sched = None
    return opt, sched


# ---- loop ----------------------------------------------------------------------------------


def accuracy(model, x, y) -> float:
    return float((np.asarray(model(x)).argmax(axis=1) == y).mean())


class Progress:
    """A tqdm bar with the running loss when tqdm is installed (and wanted), else nothing
    during the epoch; the per-epoch summary line is printed either way."""

    def __init__(self, enabled: bool):
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            self.tqdm = tqdm
        self.bar = None

    def start(self, epoch, n_epochs, n_steps):
        if self.tqdm is not None:
            self.bar = self.tqdm(
                total=n_steps,
                desc=f"epoch {epoch}/{n_epochs}",
                unit="batch",
                leave=False,
                file=sys.stderr,
            )

    def update(self, running_loss):
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.n % 20 == 0:
                self.bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)

    def end(self, line):
        if self.bar is not None:
            self.bar.close()
        print(line, flush=True)


def train(model, train_kw, opt, sched, data, options):
    """Minibatch training; returns (train seconds, per-epoch history)."""
    (x_train, y_train), (x_val, y_val) = data
    n_rows, batch = len(x_train), options["batch_size"]
    steps = -(-n_rows // batch)
    rng = np.random.default_rng(options["seed"])
    progress = Progress(not options["no_progress"])
    history, train_seconds = [], 0.0
    for epoch in range(1, options["epochs"] + 1):
        progress.start(epoch, options["epochs"], steps)
        order = rng.permutation(n_rows)
        start, loss_sum = time.perf_counter(), 0.0
        for step in range(steps):
            idx = order[step * batch : (step + 1) * batch]
            opt.zero_grad()
            # the pixels need no gradient: the first layer skips its dx
            logits, backprop = model.forward_train(x_train[idx], input_grad=False, **train_kw)
            loss, dlogits = nn.softmax_cross_entropy(logits, y_train[idx])
            backprop(dlogits)
            opt.step()
            if sched is not None:
                sched.step()
            loss_sum += loss * len(idx)
            progress.update(loss_sum / min(n_rows, (step + 1) * batch))
        train_seconds += time.perf_counter() - start
        val_acc = accuracy(model, x_val, y_val)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / n_rows,
            "val_accuracy": val_acc,
            "lr": opt.lr,
        }
        entropy = getattr(model, "last_mean_entropy", None)
        if entropy is not None:
            record["mean_entropy"] = float(entropy)
        balance = getattr(model, "last_balance_loss", None)
        if balance is not None:
            record["balance_loss"] = float(balance)
        routing = routing_record(model, x_val)
        if routing is not None:
            record["routing"] = routing
        history.append(record)
        progress.end(
            f"epoch {epoch}/{options['epochs']}  loss {record['train_loss']:.4f}  "
            f"val acc {val_acc:.4f}  ({train_seconds:.1f} s){routing_summary(routing)}"
        )
    return train_seconds, history


def routing_record(model, x) -> dict | None:
    """The tree models' routing_stats of x as JSON values (None for the ff)."""
    if not hasattr(model, "routing_stats"):
        return None
    stats = model.routing_stats(x)
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in stats.items()}


def routing_summary(routing: dict | None) -> str:
    """'  dead leaves 3/32, entropy 4.71/5.00 bits' for the epoch line."""
    if routing is None:
        return ""
    leaves = np.asarray(routing["leaf_counts"])
    line = (
        f"  dead leaves {int((leaves == 0).sum())}/{leaves.size}, "
        f"routing entropy {routing['routing_entropy']:.2f}/"
        f"{routing['max_routing_entropy']:.0f} bits"
    )
    if "dead_node_fraction" in routing:
        line += f", dead neurons {100 * routing['dead_node_fraction']:.1f}%"
    return line


def time_inference(model, x, repeats):
    """(median, min) seconds of model(x) over `repeats` runs after one warm-up, and the
    output of the last run."""
    out = model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), out


def _blas_limits(threads):
    """Limit BLAS threads (the ff's GEMMs) like fastff's: threadpoolctl if installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "note: threadpoolctl is not installed, so BLAS keeps its own thread count "
            "(pip install fastff[train])",
            file=sys.stderr,
        )
        return None
    return threadpool_limits(threads, user_api="blas")


def main(args) -> int:
    try:
        return run(args)
    except (UsageError, FileNotFoundError, NotADirectoryError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def run(args) -> int:
    """Train, evaluate and time one model; print (and with --json write) the results."""
    options = resolve_options(args)
    dtype = np.dtype(options["dtype"])
    limits = _blas_limits(options["threads"])
    try:
        with num_threads(options["threads"]):  # this thread's kernels; BLAS through `limits`
            try:  # the model first: a bad size is found before the data is read
                model, train_kw, neurons, width = build_model(options, dtype)
            except (ValueError, TypeError, MemoryError, OverflowError) as exc:  # bad sizes
                raise UsageError(str(exc)) from exc
            train_part, val_part, (x_test, y_test), norm = prepare_data(options, dtype)
            try:
                steps_per_epoch = -(-len(train_part[0]) // options["batch_size"])
                opt, sched = build_optimizer(model, options, steps_per_epoch)
            except (ValueError, TypeError) as exc:  # an out-of-range option value
                raise UsageError(str(exc)) from exc
            print(
                f"{options['model']}: {model.n_parameters():,} parameters, {neurons} of {width} "
                f"neurons per inference; {len(train_part[0])} training, {len(val_part[0])} "
                f"validation, {len(x_test)} test images; threads: {options['threads']}",
                flush=True,
            )
            train_seconds, history = train(
                model, train_kw, opt, sched, (train_part, val_part), options
            )
            if options.get("save") is not None:
                from .io import save

                options["save"].parent.mkdir(parents=True, exist_ok=True)
                save(model, options["save"])
            inference, inference_min, logits = time_inference(
                model, x_test, options["inference_repeats"]
            )
            test_acc = float((np.asarray(logits).argmax(axis=1) == y_test).mean())
            half: dict | None = None
            if getattr(args, "half", "none") != "none":
                half_model = model.astype(args.half)
                h_med, h_min, h_logits = time_inference(
                    half_model, x_test, options["inference_repeats"]
                )
                half = {
                    "dtype": args.half,
                    "test_accuracy": float((np.asarray(h_logits).argmax(axis=1) == y_test).mean()),
                    "inference_seconds": h_med,
                    "inference_seconds_min": h_min,
                }
    finally:
        if limits is not None:
            limits.restore_original_limits()
    print(
        f"test accuracy {test_acc:.4f}; train {train_seconds:.1f} s; inference of "
        f"{len(x_test)} images {inference * 1e3:.2f} ms (median of "
        f"{options['inference_repeats']}, min {inference_min * 1e3:.2f} ms)",
        flush=True,
    )
    if half is not None:
        print(
            f"converted to {half['dtype']}: test accuracy {half['test_accuracy']:.4f} "
            f"({100 * (half['test_accuracy'] - test_acc):+.2f} points); inference "
            f"{half['inference_seconds'] * 1e3:.2f} ms "
            f"(min {half['inference_seconds_min'] * 1e3:.2f})",
            flush=True,
        )
    if options["json"] is not None:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
        config.update(model=options["model"], model_config=model.get_config(), normalisation=norm)
        result = {
            "dataset": options["dataset"],
            "model": options["model"],
            "test_accuracy": test_acc,
            "val_accuracy": history[-1]["val_accuracy"],
            "train_seconds": train_seconds,
            "inference_seconds": inference,
            "inference_seconds_min": inference_min,
            "inference_rows": int(len(x_test)),
            "neurons_per_inference": int(neurons),
            "training_width": int(width),
            "params": int(model.n_parameters()),
            "half_precision": half,
            "history": history,
            "config": config,
            "environment": {
                "fastff": __version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
            },
        }
        text = json.dumps(result, indent=2) + "\n"
        try:
            options["json"].parent.mkdir(parents=True, exist_ok=True)
            options["json"].write_text(text)
        except OSError as exc:  # checked up front; the disk may still fill up
            print(f"error: cannot write {options['json']}: {exc}\n{text}", file=sys.stderr)
            return 2
    return 0
