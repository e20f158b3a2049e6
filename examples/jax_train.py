"""Train a small JAX model whose hidden layer is fastff's UltraFFF (fastff.jax.ultra_fff).

    python examples/jax_train.py            # full run (a few seconds)
    python examples/jax_train.py --quick    # CI-sized run
    python examples/jax_train.py --json out.json

Needs JAX (`pip install "fastff[jax]"`); uses optax's Adam if optax is installed, the same
Adam written in plain JAX otherwise. The task is examples/train_ultra_mlp.py's: 3 interleaved
noisy spiral arms, classified by dense(2 -> 32) + GELU, then ultra_fff(32 -> 3, depth 4, 4
trees). The whole
training step (forward, fastff's hard-path backward, update) is one jax.jit function.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import fastff.jax as fj

DEPTH, TREES, HIDDEN = 4, 4, 32


def spirals(n_points, n_classes, noise, rng):
    """x (n, 2) float32, labels (n,) int32: n_classes spiral arms of 1.5 turns each."""
    labels = rng.integers(0, n_classes, n_points)
    radius = rng.uniform(0.05, 1.0, n_points)
    angle = 3 * np.pi * radius + 2 * np.pi * labels / n_classes
    x = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    x += noise * rng.standard_normal(x.shape)
    return x.astype(np.float32), labels.astype(np.int32)


def init(key, n_classes):
    n = TREES * (2 ** (DEPTH + 1) - 1)
    k = jax.random.split(key, 4)

    def uniform(key, shape, bound):
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    return {
        "dense.weight": uniform(k[0], (2, HIDDEN), 1.0),
        "dense.bias": jnp.zeros(HIDDEN, jnp.float32),
        # the UltraFastBERT keys and shapes fastff.UltraFFF's state_dict uses
        "fff": {
            "linear_in.weight": uniform(k[1], (n, HIDDEN), HIDDEN**-0.5),
            "linear_in.bias": uniform(k[2], (n,), HIDDEN**-0.5),
            "linear_out.weight": uniform(k[3], (n_classes, n), (TREES * (DEPTH + 1)) ** -0.5),
        },
    }


def model(params, x):
    h = jax.nn.gelu(x @ params["dense.weight"] + params["dense.bias"], approximate=False)
    return fj.ultra_fff(params["fff"], h, depth=DEPTH, parallel_size=TREES)


def loss_fn(params, x, labels):
    logits = model(params, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))


def make_optimizer(lr):
    """(name, init, update) of optax's Adam if installed, else the same Adam in a few lines."""
    try:
        import optax
    except ImportError:
        b1, b2, eps = 0.9, 0.999, 1e-8

        def init(params):
            zeros = jax.tree.map(jnp.zeros_like, params)
            return zeros, zeros, jnp.zeros((), jnp.int32)

        def update(grads, state, params):
            m, v, t = state
            t = t + 1
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
            scale = lr * jnp.sqrt(1 - b2**t) / (1 - b1**t)
            updates = jax.tree.map(lambda m, v: -scale * m / (jnp.sqrt(v) + eps), m, v)
            return updates, (m, v, t)

        return "adam (plain JAX)", init, update
    opt = optax.adam(lr)
    return "optax.adam", opt.init, opt.update


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer points and epochs (CI)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write losses and accuracy to this file")
    args = parser.parse_args(argv)
    n_train = 1500 if args.quick else 6000
    epochs = args.epochs or (12 if args.quick else 25)
    batch = 64

    rng = np.random.default_rng(args.seed)
    x_train, y_train = spirals(n_train, args.classes, 0.03, rng)
    x_test, y_test = spirals(1000, args.classes, 0.03, rng)
    params = init(jax.random.PRNGKey(args.seed), args.classes)
    name, opt_init, opt_update = make_optimizer(1e-2)
    state = opt_init(params)

    @jax.jit
    def step(params, state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, state = opt_update(grads, state, params)
        return jax.tree.map(jnp.add, params, updates), state, loss

    print(f"optimizer: {name}; hidden layer: ultra_fff depth {DEPTH}, {TREES} trees")
    losses = []
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(n_train)
        total = 0.0
        n_batches = n_train // batch
        for b in range(n_batches):
            idx = order[b * batch : (b + 1) * batch]
            params, state, loss = step(params, state, x_train[idx], y_train[idx])
            total += float(loss)
        losses.append(total / n_batches)
        print(f"epoch {epoch + 1:3d}  loss {losses[-1]:.4f}")
    elapsed = time.perf_counter() - start
    predict = jax.jit(lambda p, x: jnp.argmax(model(p, x), axis=1))
    accuracy = float(np.mean(np.asarray(predict(params, x_test)) == y_test))
    print(f"test accuracy {accuracy:.3f} ({elapsed:.1f} s training)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"losses": losses, "test_accuracy": accuracy, "optimizer": name}, f)
    return accuracy


if __name__ == "__main__":
    main()
