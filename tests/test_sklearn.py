"""fastff.sklearn: scikit-learn's estimator checks, digits accuracy, model selection, pickling,
partial_fit, warm_start and n_threads. Skipped without scikit-learn."""

import pickle
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import fastff  # noqa: E402
from fastff.sklearn import FFFClassifier, FFFRegressor  # noqa: E402

# the short fits here stop at max_iter on purpose
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

# tests/conftest.py makes every kernel call, however small, run on all threads (its
# work-per-thread is 1); on this suite's tiny batches that costs more than the work on a busy
# 2-core machine (the digits fit: 41 s instead of 1 s), so the tests train on one thread
# (ONE) except where they test n_threads.
ONE = {"n_threads": 1}

# Small models and few epochs keep the ~50 checks per instance fast. Every check passes: no
# expected failures are declared.
# float64: in float32 the read-out's GEMM rounds differently with the number of rows, which
# check_methods_subset_invariance (rtol 1e-7) would see.
SMALL = {
    "depth": 2,
    "leaf_width": 8,
    "hidden_width": 16,
    "max_iter": 40,
    "learning_rate_init": 0.01,
    "dtype": "float64",
    **ONE,
}
CHECKED = [
    FFFClassifier(kind="fff", **SMALL),
    FFFClassifier(kind="ultra", parallel_size=4, **SMALL),
    FFFRegressor(kind="fff", **SMALL),
    FFFRegressor(kind="ultra", parallel_size=4, **SMALL),
    FFFClassifier(kind="fff", load_balancing=0.1, master_leaf=True, **SMALL),
]


@parametrize_with_checks(CHECKED)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


@pytest.fixture(scope="module")
def digits():
    """load_digits, 75/25 split with a fixed seed, standardised on the training part."""
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(X_train)
    return scaler.transform(X_train), scaler.transform(X_test), y_train, y_test


def test_digits_accuracy(digits):
    X_train, X_test, y_train, y_test = digits
    clf = FFFClassifier(random_state=0, **ONE).fit(X_train, y_train)
    assert clf.score(X_test, y_test) >= 0.96  # 0.9756 (scikit-learn 1.9.1, fastff 0.1.0)


def test_digits_cross_val_score_in_pipeline():
    X, y = load_digits(return_X_y=True)
    pipe = make_pipeline(
        StandardScaler(), FFFClassifier(random_state=0, max_iter=30, learning_rate_init=0.01, **ONE)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        scores = cross_val_score(pipe, X[:900], y[:900], cv=3, n_jobs=2)
    assert scores.mean() >= 0.85


def test_grid_search_runs(digits):
    X_train, _, y_train, _ = digits
    search = GridSearchCV(
        FFFClassifier(max_iter=20, learning_rate_init=0.01, random_state=0, **ONE),
        {"depth": [2, 3], "leaf_width": [8, 16]},
        cv=2,
        n_jobs=2,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X_train[:400], y_train[:400])
    assert search.best_params_["depth"] in (2, 3)
    assert search.best_score_ > 0.8


@pytest.mark.parametrize("kind", ["fff", "ultra"])
def test_pickle_round_trip_predicts_identically(digits, kind):
    X_train, X_test, y_train, _ = digits
    clf = FFFClassifier(kind=kind, max_iter=5, random_state=0, **ONE).fit(X_train, y_train)
    clone = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(clone.predict(X_test), clf.predict(X_test))
    np.testing.assert_array_equal(clone.predict_proba(X_test), clf.predict_proba(X_test))
    # the optimizer state travels too: training on continues identically
    clf.partial_fit(X_train, y_train)
    clone.partial_fit(X_train, y_train)
    np.testing.assert_array_equal(clone.predict_proba(X_test), clf.predict_proba(X_test))


def test_regressor_pickle_and_save(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5))
    y = X @ rng.normal(size=(5, 2))
    reg = FFFRegressor(max_iter=30, random_state=0, **ONE).fit(X, y)
    clone = pickle.loads(pickle.dumps(reg))
    np.testing.assert_array_equal(clone.predict(X), reg.predict(X))
    assert reg.predict(X).shape == (200, 2)
    fastff.save(reg.model_, tmp_path / "model.npz")  # the fitted network, without pickle
    np.testing.assert_array_equal(
        fastff.load(tmp_path / "model.npz")(X.astype(np.float32)), reg.model_(X.astype(np.float32))
    )


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("kind", ["fff", "ultra"])
def test_fitted_classifier_saves_and_loads_without_pickle(digits, tmp_path, kind, fmt):
    X_train, X_test, y_train, _ = digits
    labels = np.array(["zero", "one", "two", "three", "four", "5", "6", "7", "8", "nine"])
    clf = FFFClassifier(kind=kind, max_iter=3, random_state=0, **ONE)
    clf.fit(X_train, labels[y_train])
    path = tmp_path / f"clf.{fmt}"
    fastff.save(clf, path)
    if fmt == "npz":  # every member reads without pickle
        with np.load(path, allow_pickle=False) as members:
            assert all(members[name].dtype != object for name in members.files)
    loaded = fastff.load(path)
    assert type(loaded) is FFFClassifier
    assert loaded.get_params() == clf.get_params()
    np.testing.assert_array_equal(loaded.classes_, clf.classes_)
    assert loaded.classes_.dtype == clf.classes_.dtype
    assert (loaded.n_features_in_, loaded.n_iter_, loaded.loss_curve_) == (
        clf.n_features_in_,
        clf.n_iter_,
        clf.loss_curve_,
    )
    np.testing.assert_array_equal(loaded.predict(X_test), clf.predict(X_test))
    np.testing.assert_array_equal(loaded.predict_proba(X_test), clf.predict_proba(X_test))
    loaded.partial_fit(X_train, labels[y_train])  # trains on, with a new optimizer state
    assert loaded.n_iter_ == clf.n_iter_ + 1


def test_fitted_regressor_saves_and_loads(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 3))
    y = X @ np.array([1.0, -2.0, 0.5])
    reg = FFFRegressor(max_iter=5, random_state=0, **ONE).fit(X, y)
    fastff.save(reg, tmp_path / "reg.safetensors")
    loaded = fastff.load(tmp_path / "reg.safetensors")
    assert type(loaded) is FFFRegressor and loaded.get_params() == reg.get_params()
    np.testing.assert_array_equal(loaded.predict(X), reg.predict(X))
    assert loaded.predict(X).shape == (120,)


def test_feature_names_survive_save_and_load(tmp_path):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(60, 3)), columns=["a", "b", "c"])
    clf = FFFClassifier(max_iter=2, random_state=0, **ONE).fit(X, rng.integers(0, 2, 60))
    fastff.save(clf, tmp_path / "clf.npz")
    loaded = fastff.load(tmp_path / "clf.npz")
    np.testing.assert_array_equal(loaded.feature_names_in_, clf.feature_names_in_)
    np.testing.assert_array_equal(loaded.predict(X), clf.predict(X))


def test_saving_needs_a_fitted_estimator_and_a_loaded_file_is_checked(tmp_path):
    with pytest.raises(sklearn.exceptions.NotFittedError):
        fastff.save(FFFClassifier(), tmp_path / "x.npz")
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    clf = FFFClassifier(max_iter=2, random_state=0, **ONE).fit(X, y)
    # a file whose estimator metadata disagrees with its network is refused
    meta_model, saved = clf.__fastff_save__()
    saved["fitted"]["n_outputs_"] = 4
    saved["fitted"]["classes_"]["values"] = [0, 1, 2, 3]
    from fastff.sklearn import estimator_from_saved

    with pytest.raises(ValueError, match="n_outputs_"):
        estimator_from_saved(saved, meta_model)
    saved = clf.__fastff_save__()[1]
    saved["params"]["depth"] = -1
    with pytest.raises(ValueError, match="depth"):
        estimator_from_saved(saved, meta_model)
    saved = clf.__fastff_save__()[1]
    saved["class"] = "os.system"
    with pytest.raises(ValueError, match="unknown estimator"):
        estimator_from_saved(saved, meta_model)


def test_partial_fit(digits):
    X_train, X_test, y_train, y_test = digits
    clf = FFFClassifier(learning_rate_init=0.01, random_state=0, **ONE)
    with pytest.raises(ValueError, match="classes"):
        clf.partial_fit(X_train, y_train)
    classes = np.unique(y_train)
    clf.partial_fit(X_train[:100], y_train[:100], classes=classes)
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 1
    np.testing.assert_array_equal(clf.classes_, classes)
    for _ in range(10):
        clf.partial_fit(X_train, y_train)
    assert clf.n_iter_ == 11
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.score(X_test, y_test) > 0.85
    with pytest.raises(ValueError, match="classes"):
        clf.partial_fit(X_train, y_train, classes=[0, 1])


def test_warm_start_continues(digits):
    X_train, _, y_train, _ = digits
    kw = {"max_iter": 3, "random_state": 0, "n_iter_no_change": 100, **ONE}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warm = FFFClassifier(warm_start=True, **kw).fit(X_train, y_train)
        model = warm.model_
        warm.fit(X_train, y_train)
        cold = FFFClassifier(**kw).fit(X_train, y_train)
        first = cold.loss_curve_[:]
        cold.fit(X_train, y_train)
    assert warm.model_ is model  # the same network, trained on
    assert warm.n_iter_ == 6 and len(warm.loss_curve_) == 6
    assert warm.loss_curve_[3] < warm.loss_curve_[2] + 0.05
    assert cold.n_iter_ == 3 and cold.loss_curve_ == first  # refitted from scratch


def test_early_stopping(digits):
    X_train, _, y_train, _ = digits
    clf = FFFClassifier(
        early_stopping=True, n_iter_no_change=5, learning_rate_init=0.01, random_state=0, **ONE
    ).fit(X_train, y_train)
    assert len(clf.validation_scores_) == clf.n_iter_ < 200
    assert clf.best_validation_score_ == max(clf.validation_scores_) > 0.9


def test_n_threads_reaches_fastff(monkeypatch, digits):
    X_train, X_test, y_train, _ = digits
    seen = []
    real = fastff.nn.softmax_cross_entropy

    def spy(logits, labels):
        seen.append(fastff.get_num_threads())
        return real(logits, labels)

    monkeypatch.setattr(fastff.nn, "softmax_cross_entropy", spy)
    clf = FFFClassifier(max_iter=1, n_threads=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    assert seen and set(seen) == {1}

    calls = []
    layer_call = type(clf.model_[0]).__call__

    def spy_call(self, x):
        calls.append(fastff.get_num_threads())
        return layer_call(self, x)

    monkeypatch.setattr(type(clf.model_[0]), "__call__", spy_call)
    clf.set_params(n_threads=2).predict(X_test)
    assert calls == [2]
    clf.set_params(n_threads=-1).predict(X_test)
    assert calls[-1] == fastff._threads.available_cpus()
    with pytest.raises(ValueError, match="n_threads"):
        clf.set_params(n_threads=0).predict(X_test)


@pytest.mark.parametrize("kind", ["fff", "ultra"])
def test_learning_quality_options_reach_the_layer(digits, kind, monkeypatch, tmp_path):
    """load_balancing reaches the hidden layer's forward_train (both kinds), master_leaf its
    constructor (fff); a refitted or reloaded estimator keeps them."""
    X_train, X_test, y_train, _ = digits
    clf = FFFClassifier(kind=kind, load_balancing=0.2, master_leaf=True, max_iter=2, **ONE)
    clf.set_params(random_state=0)
    layer_type = fastff.FFF if kind == "fff" else fastff.UltraFFF
    seen = []
    real = layer_type.forward_train

    def spy(self, x, **options):
        seen.append(options.get("load_balancing"))
        return real(self, x, **options)

    monkeypatch.setattr(layer_type, "forward_train", spy)
    clf.fit(X_train, y_train)
    assert seen and set(seen) == {0.2}
    hidden = clf.model_[0]
    assert hidden.last_balance_loss is not None
    assert getattr(hidden, "master_leaf", False) == (kind == "fff")
    path = tmp_path / "clf.safetensors"
    fastff.save(clf, path)
    loaded = fastff.load(path)
    assert loaded.get_params()["load_balancing"] == 0.2 and loaded.get_params()["master_leaf"]
    np.testing.assert_array_equal(loaded.predict(X_test), clf.predict(X_test))
    seen.clear()
    FFFClassifier(kind=kind, max_iter=1, random_state=0, **ONE).fit(X_train[:50], y_train[:50])
    assert seen == [None]  # off by default: the option is not passed at all
    # NumPy scalars, as a grid search over np.linspace gives them, save as JSON numbers
    clf.set_params(load_balancing=np.float32(0.25), master_leaf=np.True_, hardening=np.float64(1))
    clf.fit(X_train[:50], y_train[:50])
    fastff.save(clf, path)
    params = fastff.load(path).get_params()
    assert params["load_balancing"] == 0.25 and params["master_leaf"] is True


@pytest.mark.parametrize("value", [-0.5, float("nan"), "1", None])
def test_bad_load_balancing_is_refused(digits, value):
    X_train, _, y_train, _ = digits
    with pytest.raises((ValueError, TypeError), match="load_balancing"):
        FFFClassifier(load_balancing=value, max_iter=1, **ONE).fit(X_train, y_train)


def test_import_fastff_does_not_import_sklearn_adapter():
    import subprocess
    import sys

    code = (
        "import sys, fastff; "
        "assert 'fastff.sklearn' not in sys.modules and 'sklearn' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
