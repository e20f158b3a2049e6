"""scikit-learn estimators with an FFF hidden layer: ``FFFClassifier`` and ``FFFRegressor``.

``import fastff.sklearn`` (needs scikit-learn, ``pip install "fastff[sklearn]"``); a plain
``import fastff`` does not import this module. The estimators follow scikit-learn's contract
(every hyperparameter an ``__init__`` keyword stored as given, fitted attributes ending in
``_``, ``get_params``/``set_params``/``clone``, validation by ``sklearn.utils.validation``) and
``MLPClassifier``'s training vocabulary, so they drop into ``Pipeline``, ``GridSearchCV`` and
``cross_val_score``::

    from fastff.sklearn import FFFClassifier
    clf = FFFClassifier(kind="fff", depth=3, leaf_width=16, random_state=0).fit(X, y)
    clf.predict(X_test), clf.predict_proba(X_test), clf.score(X_test, y_test)

The model is ``fastff.nn.Sequential(hidden, fastff.nn.Linear(hidden_width, n_outputs))``:

* ``kind="fff"``: ``fastff.FFF(n_features, leaf_width, hidden_width, depth)``, router-leaf,
  trained soft (or ``train_hardened``) with ``hardening``, ``region_leak`` and ``dropout``,
  optionally with a ``master_leaf``; ``activation`` defaults to "relu".
* ``kind="ultra"``: ``fastff.UltraFFF(n_features, hidden_width, depth, parallel_size)``, the
  neuron tree of UltraFastBERT; ``activation`` defaults to "gelu".
* either kind: ``load_balancing`` weighs the layer's load-balancing term (0: off).

Both layers end in their own linear output projection; the read-out adds a shared bias and
lets ``hidden_width`` be chosen apart from the number of outputs. Training minimises the cross
entropy (classifier, softmax over ``classes_``) or the squared error (regressor) plus the L2
penalty ``alpha``, with ``fastff.optim.Adam`` or ``SGD`` on mini-batches, as ``MLPClassifier``
does. Fitted estimators pickle (joblib, ``n_jobs``) with the standard protocol, and
``fastff.save(est, path)`` / ``fastff.load(path)`` store and rebuild them without pickle (the
network's arrays plus the parameters and fitted attributes as JSON; not the optimizer state).
"""

from __future__ import annotations

import contextlib
import copy
import numbers
import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets, unique_labels
from sklearn.utils.validation import check_is_fitted

from . import _threads, nn, optim
from .layers import FFF, UltraFFF

try:  # scikit-learn >= 1.6
    from sklearn.utils.validation import validate_data as _sk_validate_data
except ImportError:  # scikit-learn 1.3 - 1.5: the estimator method

    def _sk_validate_data(estimator, *args, **kwargs):
        return estimator._validate_data(*args, **kwargs)


__all__ = ["FFFClassifier", "FFFRegressor", "estimator_from_saved"]

_KINDS = ("fff", "ultra")
_SOLVERS = ("adam", "sgd")
_DTYPES = {"float32": np.float32, "float64": np.float64}
# What fastff.save keeps of a fitted estimator besides its network and parameters.
_SAVED_FITTED = (
    "n_outputs_",
    "n_features_in_",
    "loss_curve_",
    "n_iter_",
    "t_",
    "best_loss_",
    "validation_scores_",
    "best_validation_score_",
)
_SAVED_ARRAYS = ("classes_", "feature_names_in_")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


_BLAS: list = []  # the threadpoolctl controller, made once (a fresh scan costs ~0.8 ms)


@contextlib.contextmanager
def _thread_scope(n_threads):
    """Threads for fitting and predicting: fastff's kernels on ``n_threads`` (None leaves
    fastff's setting; a negative count counts back from the CPUs available, -1: all of them,
    as scikit-learn's ``n_jobs``), and BLAS on one thread. The BLAS work here is the read-out's
    small GEMMs (hidden_width x n_outputs); woken BLAS workers would then spin, holding the
    cores fastff's threads need (digits predict on 10,000 rows, 2 threads, depth 4 x leaf 8:
    7.6 ms with BLAS on 2 threads, 4.0 ms on 1)."""
    if n_threads is not None and (not _is_int(n_threads) or n_threads == 0):
        raise ValueError(f"n_threads must be None or a nonzero integer, got {n_threads!r}")
    if not _BLAS:
        from threadpoolctl import ThreadpoolController

        _BLAS.append(ThreadpoolController())
    with contextlib.ExitStack() as stack:
        if n_threads is not None:
            n = int(n_threads)
            if n < 0:
                n = max(1, _threads.available_cpus() + 1 + n)
            stack.enter_context(_threads.num_threads(n))
        stack.enter_context(_BLAS[0].limit(limits=1, user_api="blas"))
        yield


class _BaseFFF(BaseEstimator):
    """Shared fitting machinery of FFFClassifier and FFFRegressor (not public)."""

    def __init__(
        self,
        kind="fff",
        depth=2,
        leaf_width=32,
        hidden_width=32,
        parallel_size=1,
        activation=None,
        hardening=0.3,
        region_leak=0.1,
        dropout=0.0,
        train_hardened=False,
        load_balancing=0.0,
        master_leaf=False,
        solver="adam",
        alpha=0.0001,
        batch_size="auto",
        learning_rate_init=0.001,
        max_iter=200,
        shuffle=True,
        random_state=None,
        tol=1e-4,
        verbose=False,
        warm_start=False,
        momentum=0.9,
        nesterovs_momentum=True,
        early_stopping=False,
        validation_fraction=0.1,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-8,
        n_iter_no_change=10,
        dtype="float32",
        n_threads=None,
    ):
        self.kind = kind
        self.depth = depth
        self.leaf_width = leaf_width
        self.hidden_width = hidden_width
        self.parallel_size = parallel_size
        self.activation = activation
        self.hardening = hardening
        self.region_leak = region_leak
        self.dropout = dropout
        self.train_hardened = train_hardened
        self.load_balancing = load_balancing
        self.master_leaf = master_leaf
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.dtype = dtype
        self.n_threads = n_threads

    # ---- to be provided by the subclasses -------------------------------------------------
    _is_classifier = False

    def _encode_targets(self, y, *, first: bool, classes=None):  # pragma: no cover
        raise NotImplementedError

    def _loss(self, out, target):  # pragma: no cover
        raise NotImplementedError

    def _validation_score(self, X, y) -> float:  # pragma: no cover
        raise NotImplementedError

    # ---- checks ---------------------------------------------------------------------------
    def _check_params(self) -> None:
        _check(self.kind in _KINDS, f"kind must be one of {_KINDS}, got {self.kind!r}")
        _check(self.solver in _SOLVERS, f"solver must be one of {_SOLVERS}, got {self.solver!r}")
        _check(self.dtype in _DTYPES, f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        _check(_is_int(self.depth) and self.depth >= 0, f"depth must be >= 0, got {self.depth!r}")
        for name in ("leaf_width", "hidden_width", "parallel_size", "max_iter"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        _check(
            _is_int(self.n_iter_no_change) and self.n_iter_no_change >= 1,
            f"n_iter_no_change must be an integer >= 1, got {self.n_iter_no_change!r}",
        )
        _check(
            self.batch_size == "auto" or (_is_int(self.batch_size) and self.batch_size >= 1),
            f"batch_size must be 'auto' or an integer >= 1, got {self.batch_size!r}",
        )
        for name in ("alpha", "tol", "hardening", "load_balancing"):
            value = getattr(self, name)
            _check(_is_real(value) and value >= 0, f"{name} must be >= 0, got {value!r}")
        _check(
            _is_real(self.learning_rate_init) and self.learning_rate_init > 0,
            f"learning_rate_init must be > 0, got {self.learning_rate_init!r}",
        )
        _check(
            _is_real(self.validation_fraction) and 0 < self.validation_fraction < 1,
            f"validation_fraction must lie in (0, 1), got {self.validation_fraction!r}",
        )
        # The remaining ones (activation, region_leak, dropout, master_leaf, momentum, betas,
        # epsilon) are checked by fastff's layers and optimizers, with their own messages.

    # ---- model ----------------------------------------------------------------------------
    def _build(self, n_features: int, n_outputs: int, rng) -> None:
        dtype = _DTYPES[self.dtype]
        seeds = rng.randint(0, 2**31 - 1, size=3)
        hidden: FFF | UltraFFF
        if self.kind == "fff":
            hidden = FFF(
                n_features,
                self.leaf_width,
                self.hidden_width,
                self.depth,
                activation="relu" if self.activation is None else self.activation,
                dropout=self.dropout,
                train_hardened=self.train_hardened,
                region_leak=self.region_leak,
                master_leaf=self.master_leaf,
                dtype=dtype,
                seed=int(seeds[0]),
            )
        else:
            hidden = UltraFFF(
                n_features,
                self.hidden_width,
                self.depth,
                self.parallel_size,
                activation="gelu" if self.activation is None else self.activation,
                dtype=dtype,
                seed=int(seeds[0]),
            )
        readout = nn.Linear(self.hidden_width, n_outputs, dtype=dtype, seed=int(seeds[1]))
        self.model_ = nn.Sequential(hidden, readout)
        self._train_rng = np.random.default_rng(int(seeds[2]))  # FFF region-leak/dropout masks
        self._optimizer: Any = None

    def _make_optimizer(self, batch_size: int):
        # MLPClassifier's penalty 0.5 * alpha * ||w||^2 / batch rows: its gradient is an L2
        # weight decay of alpha / batch_size (applied here to the biases too).
        decay = float(self.alpha) / batch_size
        lr = float(self.learning_rate_init)
        if self.solver == "adam":
            return optim.Adam(
                self.model_,
                lr=lr,
                betas=(self.beta_1, self.beta_2),
                eps=self.epsilon,
                weight_decay=decay,
            )
        return optim.SGD(
            self.model_,
            lr=lr,
            momentum=self.momentum,
            nesterov=bool(self.nesterovs_momentum) and self.momentum > 0,
            weight_decay=decay,
        )

    def _batch_size(self, n_samples: int) -> int:
        if self.batch_size == "auto":
            return min(200, n_samples)
        return min(int(self.batch_size), n_samples)

    def _penalty(self, n_rows: int) -> float:
        if not self.alpha:
            return 0.0
        total = sum(float(np.dot(p.ravel(), p.ravel())) for p in self.model_.params.values())
        return 0.5 * float(self.alpha) * total / n_rows

    def _forward_options(self):
        options: dict[str, Any] = {}
        if self.kind == "fff":
            options = {"rng": self._train_rng, "hardening": float(self.hardening)}
        if self.load_balancing:  # left out at 0: the call is then the one before the option
            options["load_balancing"] = float(self.load_balancing)
        return options

    def _epoch(self, X, target, rng, batch_size: int) -> float:
        """One pass over (X, target) in mini-batches; returns the mean loss (penalty included)."""
        n = X.shape[0]
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        opt, options = self._optimizer, self._forward_options()
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            xb = np.ascontiguousarray(X[idx])
            opt.zero_grad()
            out, backprop = self.model_.forward_train(xb, input_grad=False, **options)
            loss, dout = self._loss(out, target[idx])
            backprop(dout)
            opt.step()
            total += (loss + self._penalty(len(idx))) * len(idx)
        return total / n

    def _as_features(self, X, *, reset: bool):
        return _sk_validate_data(
            self, X, reset=reset, dtype=_DTYPES[self.dtype], order="C", accept_sparse=False
        )

    def _fit(self, X, y, *, incremental: bool, classes=None):
        self._check_params()
        fitted = hasattr(self, "model_")
        first = not (fitted and (incremental or self.warm_start))
        X, y = _sk_validate_data(
            self,
            X,
            y,
            reset=first,
            dtype=_DTYPES[self.dtype],
            order="C",
            multi_output=not self._is_classifier,
            y_numeric=not self._is_classifier,
        )
        target = self._encode_targets(y, first=first, classes=classes)
        if first or not hasattr(self, "_random_state"):
            # one stream for the whole fit, kept for partial_fit and warm_start's next epochs
            self._random_state = check_random_state(self.random_state)
        rng = self._random_state
        if first:
            self._build(X.shape[1], self._n_outputs(), rng)
            self.loss_curve_ = []
            self.n_iter_ = 0
            self.t_ = 0
            self.best_loss_ = np.inf
            self.validation_scores_: list | None = [] if self.early_stopping else None
            self.best_validation_score_ = -np.inf if self.early_stopping else None
        early = self.early_stopping and not incremental
        X_val = y_val = None
        if early:
            stratify = y if self._is_classifier else None
            try:
                X, X_val, target, y_val = train_test_split(
                    X,
                    target,
                    test_size=self.validation_fraction,
                    random_state=rng,
                    stratify=stratify,
                )
            except ValueError:  # too few rows of a class to stratify
                X, X_val, target, y_val = train_test_split(
                    X, target, test_size=self.validation_fraction, random_state=rng
                )
            if X.shape[0] < 1 or X_val.shape[0] < 1:
                raise ValueError("early_stopping needs at least 2 rows")
        batch_size = self._batch_size(X.shape[0])
        if self._optimizer is None or not (incremental or self.warm_start):
            self._optimizer = self._make_optimizer(batch_size)
        epochs = 1 if incremental else int(self.max_iter)
        self._no_improvement = 0
        best_state = None
        scores: list = [] if self.validation_scores_ is None else self.validation_scores_
        best_score = -np.inf
        if early:
            self.validation_scores_ = scores
            if self.best_validation_score_ is not None:
                best_score = self.best_validation_score_
        with _thread_scope(self.n_threads):
            for _ in range(epochs):
                loss = self._epoch(X, target, rng, batch_size)
                self.n_iter_ += 1
                self.t_ += X.shape[0]
                self.loss_curve_.append(loss)
                if self.verbose:
                    print(f"Iteration {self.n_iter_}, loss = {loss:.8f}")
                if incremental:
                    continue
                if early:
                    score = self._validation_score(X_val, y_val)
                    scores.append(score)
                    if score < best_score + self.tol:
                        self._no_improvement += 1
                    else:
                        self._no_improvement = 0
                    if score > best_score:
                        best_score = self.best_validation_score_ = score
                        best_state = copy.deepcopy(self.model_.state_dict())
                else:
                    if loss > self.best_loss_ - self.tol:
                        self._no_improvement += 1
                    else:
                        self._no_improvement = 0
                    self.best_loss_ = min(self.best_loss_, loss)
                if self._no_improvement > self.n_iter_no_change:
                    if self.verbose:
                        what = "Validation score" if early else "Training loss"
                        print(
                            f"{what} did not improve more than tol={self.tol} for "
                            f"{self.n_iter_no_change} consecutive epochs. Stopping."
                        )
                    break
            else:
                if not incremental and epochs > 0:
                    warnings.warn(
                        f"Stochastic optimizer: maximum iterations ({self.max_iter}) reached "
                        "and the optimization hasn't converged yet.",
                        ConvergenceWarning,
                        stacklevel=3,
                    )
        if early and best_state is not None:
            self.model_.load_state_dict(best_state)
        return self

    def _raw_output(self, X):
        check_is_fitted(self, "model_")
        X = self._as_features(X, reset=False)
        with _thread_scope(self.n_threads):
            return self.model_(X)

    # ---- fastff.save / fastff.load (JSON metadata and the network's arrays, no pickle) -----
    def __fastff_save__(self):
        """(network, metadata) for fastff.save: the fitted ``model_`` and, as JSON, the
        estimator's parameters and fitted attributes. The optimizer's state is not kept:
        ``partial_fit`` or ``warm_start`` after a load start new Adam moments or momenta."""
        check_is_fitted(self, "model_")
        params = self.get_params(deep=False)
        if not (params["random_state"] is None or _is_int(params["random_state"])):
            warnings.warn(
                "fastff.save keeps an integer random_state or None; this estimator's "
                f"{type(params['random_state']).__name__} is saved as None",
                UserWarning,
                stacklevel=3,
            )
            params["random_state"] = None
        for name, value in params.items():  # NumPy scalars (np.float32(0.2), np.True_) as JSON
            if isinstance(value, np.generic):
                params[name] = value.item()
        fitted: dict[str, Any] = {
            name: getattr(self, name) for name in _SAVED_FITTED if hasattr(self, name)
        }
        for name in _SAVED_ARRAYS:
            if hasattr(self, name):
                values = getattr(self, name)
                fitted[name] = {"dtype": values.dtype.str, "values": values.tolist()}
        if not self._is_classifier:
            fitted["y_1d"] = bool(self._y_1d)
        return self.model_, {"class": type(self).__name__, "params": params, "fitted": fitted}

    def _more_tags(self):  # scikit-learn < 1.6
        return {"multioutput": not self._is_classifier}

    def __sklearn_tags__(self):  # scikit-learn >= 1.6
        tags = super().__sklearn_tags__()
        if not self._is_classifier:
            tags.target_tags.multi_output = True
        return tags


class FFFClassifier(ClassifierMixin, _BaseFFF):
    """Classifier with an FFF hidden layer (``kind="fff"`` router-leaf or ``"ultra"`` neuron
    tree) and a linear read-out, trained on the softmax cross entropy.

    Parameters are those of ``MLPClassifier`` where they apply (``solver`` "adam" or "sgd",
    ``alpha``, ``batch_size``, ``learning_rate_init``, ``max_iter``, ``shuffle``,
    ``random_state``, ``tol``, ``verbose``, ``warm_start``, ``momentum``,
    ``nesterovs_momentum``, ``early_stopping``, ``validation_fraction``, ``beta_1``, ``beta_2``,
    ``epsilon``, ``n_iter_no_change``), plus the layer's: ``kind``, ``depth``, ``leaf_width``
    (fff), ``hidden_width`` (the layer's output width, input of the read-out),
    ``parallel_size`` (ultra), ``activation`` (None: "relu" for fff, "gelu" for ultra),
    ``hardening``, ``region_leak``, ``dropout``, ``train_hardened``, ``master_leaf`` (fff);
    ``load_balancing`` (both kinds: the layers' load-balancing weight, README "Learning
    quality"); ``dtype`` "float32" or "float64"; ``n_threads`` for fastff's kernels (None:
    fastff's setting; -1: every CPU). ``hardening``, ``region_leak``, ``dropout``,
    ``train_hardened`` and ``master_leaf`` apply to ``kind="fff"`` only. The defaults of the
    first two (0.3 and 0.1) push the soft-trained routers towards the hard decisions that
    ``predict`` takes: on ``load_digits`` (75/25 split, standardised) the defaults score 0.976,
    against 0.889 with both at 0. ``loss_curve_`` holds the prediction loss plus the ``alpha``
    penalty; the hardening and balancing terms are trained on but not reported there.

    Fitted attributes: ``classes_``, ``n_features_in_``, ``feature_names_in_`` (DataFrame
    input), ``model_`` (the fastff.nn.Sequential), ``loss_curve_``, ``n_iter_``, ``t_``,
    ``best_loss_``, ``validation_scores_``, ``best_validation_score_``, ``n_outputs_``.
    """

    _is_classifier = True

    def _n_outputs(self) -> int:
        return self.n_outputs_

    def _encode_targets(self, y, *, first: bool, classes=None):
        check_classification_targets(y)
        if first:
            self.classes_ = unique_labels(y if classes is None else np.asarray(classes))
            self.n_outputs_ = len(self.classes_)
        unseen = np.setdiff1d(unique_labels(y), self.classes_)
        if unseen.size:
            raise ValueError(f"y has classes not in classes_ {self.classes_}: {unseen}")
        return np.searchsorted(self.classes_, y).astype(np.intp)

    def _loss(self, out, target):
        return nn.softmax_cross_entropy(out, target)

    def _validation_score(self, X, y) -> float:
        with _thread_scope(self.n_threads):
            logits = self.model_(X)
        return float(np.mean(np.argmax(logits, axis=1) == y))

    def fit(self, X, y):
        """Train on (X, y) for up to ``max_iter`` epochs (from the current weights with
        ``warm_start``)."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y, classes=None):
        """One epoch over (X, y). ``classes`` (every label y may ever hold) is required on the
        first call, as in MLPClassifier."""
        if not hasattr(self, "model_") and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        if hasattr(self, "model_") and classes is not None:
            if not np.array_equal(unique_labels(np.asarray(classes)), self.classes_):
                raise ValueError(
                    f"`classes={list(classes)}` is not the same as on last call to "
                    f"partial_fit, was: {self.classes_}"
                )
            classes = None
        return self._fit(X, y, incremental=True, classes=classes)

    def _logits(self, X):
        return np.asarray(self._raw_output(X), dtype=np.float64)

    def decision_function(self, X):
        """The logits, (n_samples, n_classes); for two classes the score of ``classes_[1]``,
        (n_samples,), as scikit-learn's binary classifiers give it."""
        logits = self._logits(X)
        if logits.shape[1] == 2:
            return logits[:, 1] - logits[:, 0]
        return logits

    def predict_log_proba(self, X):
        """Log class probabilities, (n_samples, n_classes), columns in ``classes_`` order."""
        logits = self._logits(X)
        logits -= logits.max(axis=1, keepdims=True)
        logits -= np.log(np.exp(logits).sum(axis=1, keepdims=True))
        return logits

    def predict_proba(self, X):
        """Class probabilities, (n_samples, n_classes), columns in ``classes_`` order."""
        return np.exp(self.predict_log_proba(X))

    def predict(self, X):
        """The most probable class of each row."""
        logits = self._raw_output(X)
        return self.classes_[np.argmax(logits, axis=1)]


class FFFRegressor(RegressorMixin, _BaseFFF):
    """Regressor with an FFF hidden layer and a linear read-out, trained on the squared error
    (``MLPRegressor``'s vocabulary; the parameters are FFFClassifier's). ``y`` may have several
    columns; ``predict`` returns ``y``'s shape (1-D for a 1-D ``y``)."""

    _is_classifier = False

    def _n_outputs(self) -> int:
        return self.n_outputs_

    def _encode_targets(self, y, *, first: bool, classes=None):
        y = np.asarray(y, dtype=_DTYPES[self.dtype])
        width = 1 if y.ndim == 1 else y.shape[1]
        if first:
            self.n_outputs_ = width
            self._y_1d = y.ndim == 1
        elif width != self.n_outputs_:
            raise ValueError(f"y has {width} columns; the model was fitted on {self.n_outputs_}")
        return y.reshape(-1, width)

    def _loss(self, out, target):
        # MLPRegressor's loss is half the mean squared error per row (summed over outputs)
        loss, grad = nn.mse(out, target)
        scale = out.shape[1] / 2
        return loss * scale, grad * out.dtype.type(scale)

    def _validation_score(self, X, y) -> float:
        from sklearn.metrics import r2_score

        with _thread_scope(self.n_threads):
            pred = self.model_(X)
        return float(r2_score(y, pred))

    def fit(self, X, y):
        """Train on (X, y) for up to ``max_iter`` epochs (from the current weights with
        ``warm_start``)."""
        return self._fit(X, y, incremental=False)

    def partial_fit(self, X, y):
        """One epoch over (X, y)."""
        return self._fit(X, y, incremental=True)

    def predict(self, X):
        """Predictions of y's shape: (n_samples,) or (n_samples, n_outputs)."""
        out = np.asarray(self._raw_output(X), dtype=np.float64)
        return out.ravel() if self._y_1d else out


def estimator_from_saved(saved: dict, model) -> _BaseFFF:
    """The estimator fastff.load rebuilds from a file's metadata `saved` (written by
    ``__fastff_save__``) around its loaded network `model`. The metadata is untrusted: its
    class, parameters and fitted attributes are checked against each other and the network;
    anything else raises ValueError or TypeError."""
    classes = {"FFFClassifier": FFFClassifier, "FFFRegressor": FFFRegressor}
    if not isinstance(saved, dict) or saved.get("class") not in classes:
        raise ValueError(
            f"unknown estimator {saved.get('class') if isinstance(saved, dict) else saved!r}"
        )
    params, fitted = saved.get("params"), saved.get("fitted")
    if not isinstance(params, dict) or not isinstance(fitted, dict):
        raise ValueError("estimator metadata without params or fitted attributes")
    cls = classes[saved["class"]]
    unknown = set(params) - set(cls().get_params())
    if unknown:
        raise ValueError(f"unknown {cls.__name__} parameters {sorted(unknown)}")
    est = cls(**params)
    est._check_params()
    layers = getattr(model, "layers", None)
    if not isinstance(model, nn.Sequential) or not layers or len(layers) != 2:
        raise ValueError("the network is not an FFF hidden layer and a read-out")
    hidden, readout = layers
    want = FFF if est.kind == "fff" else UltraFFF
    if not isinstance(hidden, want) or not isinstance(readout, nn.Linear):
        raise ValueError(f"kind={est.kind!r} does not match the saved network")
    for name in _SAVED_FITTED:
        if name in fitted:
            setattr(est, name, fitted[name])
    for name in _SAVED_ARRAYS:
        if name in fitted:
            entry = fitted[name]
            if not isinstance(entry, dict) or not isinstance(entry.get("values"), list):
                raise ValueError(f"{name} is not a saved array")
            dtype = np.dtype(entry.get("dtype"))
            setattr(est, name, np.asarray(entry["values"], dtype=dtype))
    checks = {
        "n_features_in_": hidden.input_width,
        "n_outputs_": readout.output_width,
    }
    for name, width in checks.items():
        if getattr(est, name, None) != width:
            raise ValueError(
                f"{name} {getattr(est, name, None)!r} does not match the network ({width})"
            )
    if est._is_classifier:
        if not hasattr(est, "classes_") or est.classes_.shape != (est.n_outputs_,):
            raise ValueError("classes_ does not match the network's outputs")
    else:
        est._y_1d = bool(fitted.get("y_1d", est.n_outputs_ == 1))
    if not isinstance(est.loss_curve_, list) or not _is_int(est.n_iter_):
        raise ValueError("corrupt loss_curve_ or n_iter_")
    est.model_ = model
    est._random_state = check_random_state(est.random_state)
    est._train_rng = np.random.default_rng(est._random_state.randint(2**31))
    est._optimizer = None
    return est
