"""Train a small network with an UltraFFF hidden layer on a synthetic spiral task, NumPy only.

    python examples/train_ultra_mlp.py            # full run (a few seconds)
    python examples/train_ultra_mlp.py --quick    # CI-sized run
    python examples/train_ultra_mlp.py --json out.json

The task: points of `--classes` interleaved 2-D spiral arms with noise, classified by
Sequential(Linear(2 -> 32), GELU, UltraFFF(32 -> classes, depth 4, 4 trees)). Each row
evaluates 4 * 5 = 20 of the trees' 124 neurons. Prints the mean training loss per epoch and the
accuracy on held-out points.
"""

import argparse
import json
import time

import numpy as np

import fastff
from fastff import nn, optim


def spirals(n_points, n_classes, noise, rng):
    """x (n, 2) float32, labels (n,) int64: n_classes spiral arms of 1.5 turns each."""
    labels = rng.integers(0, n_classes, n_points)
    radius = rng.uniform(0.05, 1.0, n_points)
    angle = 3 * np.pi * radius + 2 * np.pi * labels / n_classes
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x += noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), labels


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer points and epochs (CI)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="kernel threads (default 1: batches of 64 rows are too small to gain from more)",
    )
    parser.add_argument("--json", default=None, help="write losses and accuracy here")
    args = parser.parse_args(argv)
    n_points = 3000 if args.quick else 6000
    epochs = args.epochs or (15 if args.quick else 40)
    fastff.set_num_threads(args.threads)

    rng = np.random.default_rng(args.seed)
    x, labels = spirals(n_points, args.classes, noise=0.02, rng=rng)
    x_test, labels_test = spirals(1000, args.classes, noise=0.02, rng=rng)
    model = nn.Sequential(
        nn.Linear(2, 32, seed=args.seed),
        nn.GELU(),
        fastff.UltraFFF(32, args.classes, depth=4, parallel_size=4, seed=args.seed + 1),
    )
    batch = 64
    steps = -(-n_points // batch)
    opt = optim.Adam(model, lr=1e-2)
    schedule = optim.CosineLR(opt, total_steps=epochs * steps, warmup_steps=steps)
    losses = []
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        order = rng.permutation(n_points)
        total = 0.0
        for i in range(0, n_points, batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            logits, backprop = model.forward_train(x[idx], input_grad=False)
            loss, dlogits = nn.softmax_cross_entropy(logits, labels[idx])
            backprop(dlogits)
            opt.step()
            schedule.step()
            total += loss * len(idx)
        losses.append(total / n_points)
        print(f"epoch {epoch:3d}  loss {losses[-1]:.4f}", flush=True)
    accuracy = float((model(x_test).argmax(axis=1) == labels_test).mean())
    seconds = time.perf_counter() - start
    print(f"test accuracy {accuracy:.4f} ({seconds:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"losses": losses, "test_accuracy": accuracy, "seconds": seconds}, f)


if __name__ == "__main__":
    main()
