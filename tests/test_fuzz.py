"""Fuzzing every public entry point with hypothesis.

Random arrays (every dtype numpy has a kind for: float, int, bool, complex, object, str, bytes,
datetime; 0-d to 3-d, empty, wrong widths; NaN, Inf, huge values; C, Fortran, strided,
reversed, read-only layouts and nested lists) and random constructor arguments (negative,
huge, NaN, bool, None, str, numpy scalars, 0-d arrays) go to the layer constructors, calls,
forward_train and backprop, the fastff.nn modules and losses, the optimizers and schedules,
load_state_dict, save/load (random and mutated bytes), the IDX reader and set_num_threads.

The contract checked on every call: it raises a documented exception (ValueError, TypeError,
MemoryError; fastff.WeightFileError and fastff.data.DatasetError are ValueErrors; RuntimeError
for a stale backprop), or returns a result of the right shape and dtype that is finite in every
row whose inputs are finite and moderate (|v| <= 1e4). A failed load_state_dict changes nothing.

Each test exists twice: a fast version in the default run (FAST_EXAMPLES examples) and a slow
one (`--runslow`, FASTFF_FUZZ_EXAMPLES examples, 1000 by default). Every call counts towards
the totals printed at the end of the run (tests/conftest.py).
"""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastff
from fastff import nn, optim
from fastff.data import DatasetError, read_idx

FAST_EXAMPLES = 40
SLOW_EXAMPLES = int(os.environ.get("FASTFF_FUZZ_EXAMPLES", "1000"))
DOCUMENTED = (ValueError, TypeError, MemoryError)
MODERATE = 1e4  # results must be finite where every input is finite and at most this large
HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def fuzz_tests(body):
    """(fast test, slow test) running `body(data, count)`; count(name) records one call."""

    def run(data, fuzz_cases):
        def count(name):
            fuzz_cases[name] += 1

        _JUNK_DRAWN[0] = False
        with np.errstate(all="ignore"):  # NaN/Inf inputs make NumPy warn; they are the point
            body(data, count)

    @settings(max_examples=FAST_EXAMPLES, suppress_health_check=HEALTH, deadline=None)
    @given(data=st.data())
    def fast(fuzz_cases, data):
        run(data, fuzz_cases)

    @pytest.mark.slow
    @settings(max_examples=SLOW_EXAMPLES, suppress_health_check=HEALTH, deadline=None)
    @given(data=st.data())
    def slow(fuzz_cases, data):
        run(data, fuzz_cases)

    return fast, slow


# Whether the running example has drawn from a junk branch of `mostly` yet. A `strict` attempt
# whose arguments all come from `mostly` strategies whose valid branches are valid must then
# succeed: otherwise a function that always raised a documented exception would pass.
_JUNK_DRAWN = [False]


def attempt(count, name, call, allowed=DOCUMENTED, strict=False):
    """(True, result) or (False, exception) for an allowed exception; anything else fails, and
    so does any exception of a strict attempt while only valid branches were drawn."""
    count(name)
    try:
        return True, call()
    except allowed as exc:
        assert str(exc), f"{name}: {type(exc).__name__} without a message"
        assert not strict or _JUNK_DRAWN[0], (
            f"{name} raised on arguments drawn from valid branches only: "
            f"{type(exc).__name__}: {exc}"
        )
        return False, exc


# ---- random inputs -------------------------------------------------------------------------------

DTYPES = [
    np.float32,
    np.float64,
    np.float16,
    np.longdouble,
    np.int8,
    np.int64,
    np.uint8,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
    object,
    "U3",
    "S2",
    "datetime64[s]",
]
LAYOUTS = ["C", "F", "strided", "reversed", "readonly", "list"]
SPECIALS = [None, np.nan, np.inf, -np.inf]


@st.composite
def arrays(draw, width, ndim_range=(0, 3)):
    """An array-like meant for an argument of shape (..., width): usually that shape (so that
    results get checked), else 0-d, wrong widths or empty axes; any dtype; NaN/Inf/huge values;
    any memory layout."""
    dtype = np.dtype(
        draw(mostly(st.sampled_from([np.float32, np.float64, np.int64]), st.sampled_from(DTYPES)))
    )
    low, high = ndim_range
    ndim = draw(mostly(st.integers(max(low, 1), high), st.integers(low, high)))
    shape = draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim))
    if ndim and width is not None and draw(mostly(st.just(True), st.just(False))):
        shape[-1] = width
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(mostly(st.sampled_from([1.0, 1e3]), st.sampled_from([1e30, 1e300])))
    values = rng.standard_normal(shape) * scale
    special = draw(st.sampled_from(SPECIALS))
    if special is not None and values.size:
        values.flat[rng.integers(values.size)] = special
    if dtype.kind == "f":
        arr = values.astype(dtype)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    elif dtype.kind == "b":
        arr = rng.random(shape) < 0.5
    elif dtype.kind == "c":
        arr = (values + 1j).astype(dtype)
    elif dtype.kind == "O":
        arr = np.empty(shape, dtype=object)
        value = draw(st.sampled_from([1, 2.5, None, "a", (1, 2)]))
        for index in np.ndindex(*shape):  # element by element: a tuple would broadcast
            arr[index] = value
    elif dtype.kind in "US":
        arr = np.full(shape, "1.5", dtype=dtype)
    else:  # datetime
        arr = np.zeros(shape, dtype=dtype)
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "F":
        arr = np.asfortranarray(arr)
    elif layout == "strided" and arr.ndim:
        wide = np.repeat(arr, 2, axis=-1)
        arr = wide[..., ::2]
    elif layout == "reversed" and arr.ndim:
        arr = arr[::-1]
    elif layout == "readonly":
        arr = np.array(arr)
        arr.flags.writeable = False
    elif layout == "list":
        return arr.tolist()
    return arr


def moderate_rows(*arrays_):
    """Bool per leading index: True where every input row is finite and |v| <= MODERATE. Each
    argument is an array of shape (..., width) with the same leading shape."""
    ok = None
    for a in arrays_:
        a = np.asarray(a, dtype=np.float64)
        row_ok = (np.isfinite(a) & (np.abs(a) <= MODERATE)).all(axis=-1)
        ok = row_ok if ok is None else ok & row_ok
    return ok


def mostly(valid, junk):
    """Valid values four times in five: a call taking several arguments still gets past its
    checks often enough for its results (and what follows) to be checked."""
    return st.sampled_from((True, True, True, True, False)).flatmap(
        lambda use_valid: valid if use_valid else junk.map(_junk)
    )


def _junk(value):
    _JUNK_DRAWN[0] = True
    return value


def junk_ints(lo, hi):
    """Integers in [lo, hi], the valid ones (small enough to build quickly), or non-integers and
    out-of-range ones: below lo, huge, NaN, bools, None, strings, numpy scalars, arrays."""
    return mostly(
        st.integers(lo, hi),
        st.one_of(
            st.integers(lo - 3, lo),
            st.sampled_from([2**31, 2**40, 2**63, 10**30, -(2**40)]),
            st.floats(allow_nan=True, allow_infinity=True),
            st.booleans(),
            st.none(),
            st.text(max_size=3),
            st.sampled_from(
                [np.int64(3), np.uint8(2), np.float32(2.0), np.array(3), np.array([2]), 2 + 0j]
            ),
        ),
    )


def junk_reals(lo, hi):
    """Floats in [lo, hi] or not: NaN, Inf, huge, negative, bools, strings, arrays."""
    return mostly(
        st.floats(lo, hi),
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.integers(-10, 10),
            st.booleans(),
            st.none(),
            st.text(max_size=3),
            st.sampled_from([np.float32(0.5), np.float64(1e300), np.array(0.1), 1j]),
        ),
    )


def junk_choices(valid):
    return mostly(
        st.sampled_from(valid),
        st.one_of(
            st.text(max_size=5),
            st.none(),
            st.integers(),
            st.sampled_from([v.upper() for v in valid]),
        ),
    )


DTYPE_ARGS = mostly(
    st.sampled_from([np.float32, np.float64, "float32", "f8"]),
    st.sampled_from(
        [np.float16, np.int32, np.complex64, object, None, "nope", np.dtype(">f4"), 3.5]
    ),
)


# ---- layer constructors --------------------------------------------------------------------------


def check_ultra_constructor(data, count):
    args = dict(
        input_width=data.draw(junk_ints(1, 40)),
        output_width=data.draw(junk_ints(1, 40)),
        depth=data.draw(junk_ints(0, 7)),
        parallel_size=data.draw(junk_ints(1, 3)),
        activation=data.draw(junk_choices(["gelu", "relu", "identity"])),
        dtype=data.draw(DTYPE_ARGS),
        seed=data.draw(st.one_of(st.none(), st.integers(0, 9))),
    )
    ok, layer = attempt(count, "UltraFFF()", lambda: fastff.UltraFFF(**args), strict=True)
    if ok:
        n = layer.parallel_size * (2 ** (layer.depth + 1) - 1)
        shapes = {k: v.shape for k, v in layer.state_dict().items()}
        assert shapes == {
            "linear_in.weight": (n, layer.input_width),
            "linear_in.bias": (n,),
            "linear_out.weight": (layer.output_width, n),
        }
        assert all(np.isfinite(v).all() for v in layer.state_dict().values())


def check_fff_constructor(data, count):
    args = dict(
        input_width=data.draw(junk_ints(1, 30)),
        leaf_width=data.draw(junk_ints(1, 8)),
        output_width=data.draw(junk_ints(1, 30)),
        depth=data.draw(junk_ints(0, 6)),
        activation=data.draw(junk_choices(["gelu", "relu", "identity"])),
        dropout=data.draw(junk_reals(0, 0.99)),
        train_hardened=data.draw(mostly(st.booleans(), st.one_of(st.integers(0, 1), st.none()))),
        region_leak=data.draw(junk_reals(0, 0.99)),
        usage_mode=data.draw(junk_choices(["none", "soft", "hard"])),
        dtype=data.draw(DTYPE_ARGS),
    )
    ok, layer = attempt(count, "FFF()", lambda: fastff.FFF(**args), strict=True)
    if ok:
        n_leaves = 2**layer.depth
        shapes = {k: v.shape for k, v in layer.state_dict().items()}
        i, h, o = layer.input_width, layer.leaf_width, layer.output_width
        assert shapes == {
            "node_weights": (n_leaves - 1, i),
            "node_biases": (n_leaves - 1, 1),
            "w1s": (n_leaves, i, h),
            "b1s": (n_leaves, h),
            "w2s": (n_leaves, h, o),
            "b2s": (n_leaves, o),
        }


def check_nn_constructors(data, count):
    attempt(
        count,
        "nn.Linear()",
        lambda: nn.Linear(
            data.draw(junk_ints(1, 30)),
            data.draw(junk_ints(1, 30)),
            bias=data.draw(mostly(st.booleans(), st.one_of(st.integers(0, 1), st.none()))),
            dtype=data.draw(DTYPE_ARGS),
        ),
        strict=True,
    )
    attempt(count, "nn.Dropout()", lambda: nn.Dropout(data.draw(junk_reals(0, 0.99))), strict=True)
    parts = data.draw(
        st.lists(
            st.sampled_from(["linear", "gelu", "ultra", "float64", "junk", "same"]), max_size=4
        )
    )
    shared = nn.ReLU()
    made = {
        "linear": lambda: nn.Linear(3, 3),
        "gelu": nn.GELU,
        "ultra": lambda: fastff.UltraFFF(3, 3, 1),
        "float64": lambda: nn.Linear(3, 3, dtype=np.float64),
        "junk": lambda: "junk",
        "same": lambda: shared,
    }
    attempt(count, "nn.Sequential()", lambda: nn.Sequential(*[made[p]() for p in parts]))


test_ultra_constructor, test_ultra_constructor_slow = fuzz_tests(check_ultra_constructor)
test_fff_constructor, test_fff_constructor_slow = fuzz_tests(check_fff_constructor)
test_nn_constructors, test_nn_constructors_slow = fuzz_tests(check_nn_constructors)


# ---- calls, forward_train and backprop -----------------------------------------------------------

IN, OUT = 5, 3
_LAYERS = {}


def layer_named(name):
    """Small layers, built once: calls only accumulate gradients and usage counts into them."""
    if name not in _LAYERS:
        dt = np.float64 if name.endswith("64") else np.float32
        _LAYERS[name] = {
            "ultra32": lambda: fastff.UltraFFF(IN, OUT, 3, 2, "gelu", dtype=dt, seed=0),
            "ultra-relu64": lambda: fastff.UltraFFF(IN, OUT, 2, 1, "relu", dtype=dt, seed=0),
            "fff-soft32": lambda: fastff.FFF(
                IN,
                2,
                OUT,
                2,
                "gelu",
                dropout=0.2,
                region_leak=0.1,
                usage_mode="soft",
                dtype=dt,
                seed=0,
            ),
            "fff-hard64": lambda: fastff.FFF(
                IN,
                3,
                OUT,
                3,
                "relu",
                dropout=0.2,
                region_leak=0.1,
                train_hardened=True,
                usage_mode="hard",
                dtype=dt,
                seed=0,
            ),
            "fff-depth0-32": lambda: fastff.FFF(IN, 2, OUT, 0, "identity", dtype=dt, seed=0),
            "linear32": lambda: nn.Linear(IN, OUT, dtype=dt, seed=0),
            "sequential32": lambda: nn.Sequential(
                nn.Linear(IN, 4, seed=0),
                nn.GELU(),
                fastff.UltraFFF(4, 4, 1, seed=0),
                nn.Dropout(0.2, seed=0),
                fastff.FFF(4, 2, OUT, 1, seed=0),
            ),
        }[name]()
    return _LAYERS[name]


LAYER_NAMES = [
    "ultra32",
    "ultra-relu64",
    "fff-soft32",
    "fff-hard64",
    "fff-depth0-32",
    "linear32",
    "sequential32",
]


def train_options(data, layer):
    """Keyword options for forward_train: valid ones mostly, junk sometimes."""
    if not isinstance(layer, (fastff.FFF, nn.Sequential)):
        return {}
    options = {}
    if data.draw(st.booleans()):
        options["hardening"] = data.draw(junk_reals(0, 2))
    if data.draw(st.booleans()):
        options["rng"] = data.draw(
            st.sampled_from([None, np.random.default_rng(1), 42, "rng", np.random.RandomState(0)])
        )
    return options


def check_layer_calls(data, count):
    name = data.draw(st.sampled_from(LAYER_NAMES))
    layer = layer_named(name)
    x = data.draw(arrays(IN))
    ok, y = attempt(count, f"{type(layer).__name__}.__call__", lambda: layer(x))
    if ok:
        xa = np.asarray(x)
        assert y.shape == xa.shape[:-1] + (OUT,) and y.dtype == layer.dtype
        assert np.isfinite(y[moderate_rows(xa)]).all(), (name, x)
    options = train_options(data, layer)
    ok, out = attempt(
        count, f"{type(layer).__name__}.forward_train", lambda: layer.forward_train(x, **options)
    )
    if not ok:
        return
    y, backprop = out
    xa = np.asarray(x)
    assert y.shape == xa.shape[:-1] + (OUT,) and y.dtype == layer.dtype
    rows_ok = moderate_rows(xa)
    if options.get("hardening", 0) <= 2:
        assert np.isfinite(y[rows_ok]).all(), (name, x)
    dy = data.draw(mostly(st.just(np.ones(xa.shape[:-1] + (OUT,))), arrays(OUT)))
    layer.zero_grad()
    ok, dx = attempt(count, f"{type(layer).__name__}.backprop", lambda: backprop(dy))
    if ok:
        dya = np.asarray(dy)
        assert dya.shape == y.shape and dx.shape == xa.shape
        rows_ok = rows_ok & moderate_rows(dya)
        if options.get("hardening", 0) <= 2:
            assert np.isfinite(dx[rows_ok]).all(), (name, x, dy)
            if rows_ok.all():
                for key, g in layer.grads.items():
                    assert np.isfinite(g).all(), (name, key)


test_layer_calls, test_layer_calls_slow = fuzz_tests(check_layer_calls)


ELEMENTWISE = [nn.Identity, nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, lambda: nn.Dropout(0.3, seed=0)]


def check_elementwise(data, count):
    module = data.draw(st.sampled_from(ELEMENTWISE))()
    x = data.draw(arrays(None))
    kind = type(module).__name__
    ok, y = attempt(count, f"nn.{kind}.__call__", lambda: module(x))
    if ok:
        xa = np.asarray(x)
        assert y.shape == xa.shape and y.dtype.kind == "f"
        assert np.isfinite(y[np.isfinite(xa.astype(np.float64))]).all()
    ok, out = attempt(count, f"nn.{kind}.forward_train", lambda: module.forward_train(x))
    if ok:
        y, backprop = out
        dy = data.draw(mostly(st.just(np.ones(y.shape)), arrays(None)))
        ok, dx = attempt(count, f"nn.{kind}.backprop", lambda: backprop(dy))
        if ok:
            xa, dya = np.asarray(x, np.float64), np.asarray(dy, np.float64)
            assert dx.shape == xa.shape
            fine = np.isfinite(xa) & np.isfinite(dya) & (np.abs(dya) <= MODERATE)
            assert np.isfinite(dx[fine]).all()


test_elementwise, test_elementwise_slow = fuzz_tests(check_elementwise)


# ---- losses --------------------------------------------------------------------------------------


def check_losses(data, count):
    n_classes = data.draw(st.integers(1, 4))
    logits = data.draw(arrays(n_classes, ndim_range=(0, 3)))
    labels = data.draw(
        st.one_of(
            arrays(None, ndim_range=(0, 2)),
            st.lists(st.integers(-1, n_classes), max_size=4).map(np.array),
        )
    )
    ok, out = attempt(
        count, "nn.softmax_cross_entropy", lambda: nn.softmax_cross_entropy(logits, labels)
    )
    if ok:
        loss, grad = out
        la = np.asarray(logits)
        assert isinstance(loss, float) and grad.shape == la.shape
        if moderate_rows(la).all():
            assert np.isfinite(loss) and np.isfinite(grad).all()
    pred = data.draw(arrays(3))
    target = data.draw(st.one_of(arrays(3), st.just(np.zeros(np.shape(pred)))))
    ok, out = attempt(count, "nn.mse", lambda: nn.mse(pred, target))
    if ok:
        loss, grad = out
        assert isinstance(loss, float) and grad.shape == np.shape(pred)
        pa, ta = np.asarray(pred, np.float64), np.asarray(target, np.float64)
        if (
            np.isfinite(pa) & np.isfinite(ta) & (abs(pa) <= MODERATE) & (abs(ta) <= MODERATE)
        ).all():
            assert np.isfinite(loss) and np.isfinite(grad).all()


test_losses, test_losses_slow = fuzz_tests(check_losses)


# ---- optimizers and schedules --------------------------------------------------------------------


def check_optimizers(data, count):
    model = nn.Sequential(
        nn.Linear(3, 4, seed=1),
        nn.GELU(),
        fastff.UltraFFF(4, 2, 1, seed=2),
        fastff.FFF(2, 2, 2, 1, usage_mode="hard", seed=3),
    )
    kind = data.draw(st.sampled_from(["SGD", "Adam", "AdamW"]))
    kwargs = {
        "lr": data.draw(junk_reals(0, 1)),
        "weight_decay": data.draw(junk_reals(0, 0.1)),
        "local_batch_size": data.draw(
            mostly(st.one_of(st.none(), st.integers(1, 8)), junk_ints(1, 8))
        ),
    }
    if kind == "SGD":
        kwargs["momentum"] = data.draw(junk_reals(0, 0.99))
        kwargs["nesterov"] = data.draw(mostly(st.booleans(), st.integers(0, 1)))
    else:
        kwargs["betas"] = data.draw(
            mostly(
                st.tuples(junk_reals(0, 0.99), junk_reals(0, 0.999)),
                st.sampled_from([(0.9,), None]),
            )
        )
        kwargs["eps"] = data.draw(junk_reals(1e-12, 1e-3))
    target = data.draw(mostly(st.just(model), st.sampled_from(["not a model", nn.ReLU()])))
    # nesterov needs momentum: the one rule across two arguments
    strict = not (kwargs.get("nesterov") is True and kwargs.get("momentum") == 0)
    ok, opt = attempt(
        count, f"optim.{kind}()", lambda: getattr(optim, kind)(target, **kwargs), strict=strict
    )
    if not ok or target is not model:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    for _ in range(data.draw(st.integers(1, 3))):
        opt.zero_grad()
        y, backprop = model.forward_train(rng.standard_normal((6, 3)))
        backprop(rng.standard_normal(y.shape))
        attempt(count, f"optim.{kind}.step", opt.step)
    if opt.lr <= 1 and opt.weight_decay <= 1:  # huge rates may overflow: that is arithmetic
        for name, p in model.params.items():
            assert np.isfinite(p).all(), (kind, kwargs, name)
    ok, _ = attempt(
        count, "stale backprop", lambda: backprop(np.ones(y.shape)), allowed=(RuntimeError,)
    )
    assert not ok, "a backprop from before optimizer.step must raise"
    schedule = data.draw(st.sampled_from(["StepLR", "CosineLR", "OneCycleLR"]))
    args = {
        "StepLR": lambda: (data.draw(junk_ints(-1, 5)), data.draw(junk_reals(0, 1))),
        "CosineLR": lambda: (
            data.draw(junk_ints(-1, 10)),
            data.draw(junk_ints(-1, 5)),
            data.draw(junk_reals(0, 1e-3)),
        ),
        "OneCycleLR": lambda: (data.draw(junk_ints(-1, 10)), data.draw(junk_reals(0, 1))),
    }
    schedule_args = args[schedule]()
    ok, sched = attempt(
        count, f"optim.{schedule}()", lambda: getattr(optim, schedule)(opt, *schedule_args)
    )
    for _ in range(12 if ok else 0):  # a growing StepLR may overflow lr: a ValueError
        stepped, _ = attempt(count, f"optim.{schedule}.step", sched.step)
        if not stepped:
            break
        assert np.isfinite(opt.lr) and opt.lr >= 0, (schedule, schedule_args, opt.lr)


test_optimizers, test_optimizers_slow = fuzz_tests(check_optimizers)


# ---- load_state_dict: all or nothing -------------------------------------------------------------


def _state_equal(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)


def check_load_state_dict(data, count):
    layer = data.draw(
        st.sampled_from(
            [
                lambda: fastff.UltraFFF(3, 2, 1, seed=0),
                lambda: fastff.FFF(3, 2, 2, 2, seed=0),
                lambda: fastff.FFF(3, 2, 2, 1, usage_mode="soft", seed=0),
                lambda: nn.Sequential(nn.Linear(3, 3, seed=0), fastff.UltraFFF(3, 2, 1, seed=0)),
            ]
        )
    )()
    before = layer.state_dict()
    state = dict(before)
    for _ in range(data.draw(st.integers(0, 3))):
        action = data.draw(st.sampled_from(["replace", "drop", "add", "depth", "usage"]))
        key = data.draw(st.sampled_from(sorted(state) or ["x"]))
        if action == "replace" and key in state:
            state[key] = data.draw(
                st.one_of(
                    arrays(None),
                    st.just(np.full(np.shape(state[key]), np.nan)),
                    st.just(np.ones(np.shape(state[key]), np.int64)),
                    st.just(np.full(np.shape(state[key]), 1e300)),
                    st.none(),
                )
            )
        elif action == "drop":
            state.pop(key, None)
        elif action == "add":
            state[data.draw(st.text(max_size=4))] = np.zeros(1)
        elif action == "depth":
            state["depth"] = data.draw(st.one_of(junk_ints(0, 3), arrays(None)))
        else:
            state[data.draw(st.sampled_from(["node_usage", "leaf_usage"]))] = data.draw(
                arrays(data.draw(st.sampled_from([2, 3, 4])))
            )
    target = data.draw(st.sampled_from([state, state, "junk", None, list(state.items())]))
    ok, _ = attempt(
        count, f"{type(layer).__name__}.load_state_dict", lambda: layer.load_state_dict(target)
    )
    after = layer.state_dict()
    if not ok:
        assert _state_equal(after, before), "a failed load_state_dict changed the parameters"
    else:
        assert after.keys() == before.keys()
        for k in after:
            assert after[k].shape == before[k].shape and after[k].dtype == before[k].dtype


test_load_state_dict, test_load_state_dict_slow = fuzz_tests(check_load_state_dict)


# ---- weight files and datasets from random or damaged bytes --------------------------------------

_FILES = tempfile.mkdtemp(prefix="fastff-fuzz-")
_VALID = {}


def valid_file(suffix):
    """The bytes of a real weight file (a small Sequential), written once."""
    if suffix not in _VALID:
        path = os.path.join(_FILES, "valid" + suffix)
        fastff.save(
            nn.Sequential(
                nn.Linear(3, 4, seed=0),
                fastff.UltraFFF(4, 2, 1, seed=0),
                fastff.FFF(2, 2, 2, 1, seed=0),
            ),
            path,
        )
        with open(path, "rb") as f:
            _VALID[suffix] = f.read()
    return _VALID[suffix]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def mutate_json(data, value):
    """`value` with one part (maybe all of it) replaced by a random JSON value."""
    if isinstance(value, dict) and value and data.draw(st.integers(0, 3)) > 0:
        key = data.draw(st.sampled_from(sorted(value)))
        return {**value, key: mutate_json(data, value[key])}
    if isinstance(value, list) and value and data.draw(st.integers(0, 3)) > 0:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate_json(data, value[i])] + value[i + 1 :]
    return data.draw(JSON)


def file_with_mutated_headers(data, suffix) -> bytes:
    """A valid weight file whose JSON (the fastff metadata, and for .safetensors the tensor
    header) has one value replaced: wrong types, shapes, offsets, kinds, configs, versions."""
    import json
    import struct

    blob = valid_file(suffix)
    if suffix == ".safetensors":
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
        meta = json.loads(header["__metadata__"]["__fastff_meta__"])
        if data.draw(st.booleans()):
            header["__metadata__"]["__fastff_meta__"] = json.dumps(mutate_json(data, meta))
        else:
            header = mutate_json(data, header)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + blob[8 + n :]
    path = os.path.join(_FILES, "valid.npz")
    with np.load(path) as z:
        arrays_ = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays_.pop("__fastff_meta__")))
    text = json.dumps(mutate_json(data, meta)).encode()
    out = os.path.join(_FILES, "mutated.npz")
    np.savez(out, **arrays_, __fastff_meta__=np.frombuffer(text, np.uint8))
    with open(out, "rb") as f:
        return f.read()


def check_load_bytes(data, count):
    suffix = data.draw(st.sampled_from([".npz", ".safetensors"]))
    mode = data.draw(st.sampled_from(["bytes", "edits", "json"]))
    if mode == "json":
        blob = file_with_mutated_headers(data, suffix)
    elif mode == "edits":
        blob = bytearray(valid_file(suffix))
        for _ in range(data.draw(st.integers(1, 6))):
            pos = data.draw(st.integers(0, len(blob)))
            edit = data.draw(st.sampled_from(["flip", "cut", "insert", "truncate"]))
            if edit == "flip" and pos < len(blob):
                blob[pos] ^= 1 << data.draw(st.integers(0, 7))
            elif edit == "cut":
                del blob[pos : pos + data.draw(st.integers(1, 64))]
            elif edit == "insert":
                blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
            else:
                del blob[pos:]
        blob = bytes(blob)
    else:
        blob = data.draw(st.binary(max_size=300))
    path = os.path.join(_FILES, "fuzzed" + suffix)
    with open(path, "wb") as f:
        f.write(blob)
    fmt = data.draw(st.sampled_from([None, None, "npz", "safetensors", "pickle", 3]))
    # whatever the bytes, a bad file is a WeightFileError (a bad format name a ValueError)
    allowed = (fastff.WeightFileError,) if fmt in (None, "npz", "safetensors") else ValueError
    ok, module = attempt(count, "fastff.load", lambda: fastff.load(path, format=fmt), allowed)
    if ok:
        assert isinstance(module, fastff.Module)
        ok, _ = attempt(count, "fastff.save", lambda: fastff.save(module, path))
        assert ok, "a module that loaded must save again"


def check_idx_bytes(data, count):
    magic, item_shape = data.draw(st.sampled_from([(2049, ()), (2051, (28, 28)), (2051, (2, 3))]))
    n_dims = magic & 0xFF
    if data.draw(st.booleans()):  # a plausible header, then random data
        dims = [data.draw(st.integers(0, 5))] + list(
            data.draw(st.sampled_from([item_shape, (2, 3), (28, 28), ()]))
        )
        head = np.array([data.draw(st.sampled_from([magic, 2049, 2051, 0])), *dims], ">u4")
        blob = head.tobytes() + data.draw(st.binary(max_size=200))
    else:
        blob = data.draw(st.binary(max_size=64))
    path = os.path.join(_FILES, "fuzzed-idx")
    with open(path, "wb") as f:
        f.write(blob)
    ok, arr = attempt(
        count,
        "fastff.data.read_idx",
        lambda: read_idx(path, magic, item_shape),
        allowed=(DatasetError, MemoryError),
    )
    if ok:
        assert arr.dtype == np.uint8 and arr.ndim == n_dims and arr.shape[1:] == item_shape


test_load_bytes, test_load_bytes_slow = fuzz_tests(check_load_bytes)
test_idx_bytes, test_idx_bytes_slow = fuzz_tests(check_idx_bytes)


# ---- process-wide settings -----------------------------------------------------------------------


def check_set_num_threads(data, count):
    n = data.draw(junk_ints(1, fastff._validation.max_threads()))
    before = fastff._threads._process_wide
    try:
        ok, _ = attempt(
            count, "fastff.set_num_threads", lambda: fastff.set_num_threads(n), strict=True
        )
        if ok:
            assert fastff.get_num_threads() == int(n)
    finally:
        if before is None:
            fastff._threads.reset_num_threads()
        else:
            fastff.set_num_threads(before)


test_set_num_threads, test_set_num_threads_slow = fuzz_tests(check_set_num_threads)
