"""FFFClassifier against MLPClassifier of the same training width: predict on 10,000 rows.

The issue's measurement: scikit-learn's digits (75/25 split, standardised, fixed seed), both
estimators trained briefly, then ``predict`` timed on 10,000 rows resampled from the test part
(with a little noise, so no two rows are equal). Same thread count on both sides: fastff's
through ``n_threads``, scikit-learn's BLAS through threadpoolctl. Prints min and median of
``--repeat`` calls, and the accuracy of each on the held-out quarter.

    python benchmarks/sklearn_predict.py --threads 2 --json docs/sklearn-predict.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from fastff.sklearn import FFFClassifier

SHAPES = [(2, 32), (3, 16), (4, 8)]  # (depth, leaf_width): training width 128 each


def _times(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(X_train)
    X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
    rng = np.random.default_rng(0)
    rows = X_test[rng.integers(0, len(X_test), args.rows)]
    rows = rows + 0.01 * rng.standard_normal(rows.shape)
    results = []
    print(f"predict on {args.rows} rows, {args.threads} threads, min / median of {args.repeat}")
    for depth, leaf_width in SHAPES:
        width = 2**depth * leaf_width
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fff = FFFClassifier(
                depth=depth, leaf_width=leaf_width, random_state=0, n_threads=args.threads
            ).fit(X_train, y_train)
            mlp = MLPClassifier((width,), random_state=0).fit(X_train, y_train)
        with threadpool_limits(args.threads):
            fff_min, fff_med = _times(lambda fff=fff: fff.predict(rows), args.repeat)
            mlp_min, mlp_med = _times(lambda mlp=mlp: mlp.predict(rows), args.repeat)
        result = {
            "depth": depth,
            "leaf_width": leaf_width,
            "training_width": width,
            "fff_predict_s": fff_med,
            "fff_predict_min_s": fff_min,
            "mlp_predict_s": mlp_med,
            "mlp_predict_min_s": mlp_min,
            "speedup": mlp_med / fff_med,
            "fff_accuracy": float(fff.score(X_test, y_test)),
            "mlp_accuracy": float(mlp.score(X_test, y_test)),
        }
        results.append(result)
        print(
            f"depth {depth} leaf {leaf_width:>2} (width {width}): FFFClassifier "
            f"{fff_min * 1e3:.2f} / {fff_med * 1e3:.2f} ms, MLPClassifier {mlp_min * 1e3:.2f} / "
            f"{mlp_med * 1e3:.2f} ms: {result['speedup']:.1f}x; accuracy "
            f"{result['fff_accuracy']:.3f} vs {result['mlp_accuracy']:.3f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "rows": args.rows, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
