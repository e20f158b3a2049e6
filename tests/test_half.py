"""Half-precision weights (bfloat16, float16): UltraFFF inference against the float64
reference on the widened weights, conversion, errors, files, and both CPU code paths."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import reference as R

from conftest import assert_close, dyadic, dyadic_state

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
HALVES = [BF16, np.dtype(np.float16)]
IDS = ["bfloat16", "float16"]
ACTS = ["gelu", "relu", "identity"]
# unit roundoff of each storage format: 2**-8 (bfloat16, 8 significant bits), 2**-11 (float16)
UNIT_ROUNDOFF = {BF16: 2.0**-8, np.dtype(np.float16): 2.0**-11}


def _widened(layer):
    return {k: v.astype(np.float64) for k, v in layer.state_dict().items()}


@given(
    in_w=st.integers(1, 200),
    out_w=st.integers(1, 200),
    depth=st.integers(0, 9),
    trees=st.integers(1, 3),
    batch=st.integers(0, 200),
    half=st.sampled_from(HALVES),
    act=st.sampled_from(ACTS),
    half_input=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_inference_matches_reference(
    in_w, out_w, depth, trees, batch, half, act, half_input, seed
):
    """Dyadic weights and inputs are exact in both formats and their dots exact in float32,
    so the kernel and the float64 reference route identically; the outputs then differ by the
    float32 accumulation only."""
    batch = min(batch, max(1, 100_000 // (trees * 2 ** (depth + 1))))
    rng = np.random.default_rng(seed)
    layer = fastff.UltraFFF(in_w, out_w, depth, trees, act, seed=seed)
    state = dyadic_state(layer, rng)
    half_layer = layer.astype(half)
    assert half_layer.dtype == half and half_layer.compute_dtype == np.float32
    assert all(v.dtype == half for v in half_layer.state_dict().values())
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y = half_layer(x.astype(half) if half_input else x)
    assert y.dtype == np.float32 and y.shape == (batch, out_w)
    y_ref, _ = R.ultra_forward(x.astype(np.float64), state, depth, trees, act)
    assert_close(y, y_ref, np.float32, trees * (depth + 1) * in_w, "y")


@given(
    in_w=st.integers(1, 40),
    leaf_w=st.integers(1, 8) | st.sampled_from([63, 64, 65, 130]),
    out_w=st.integers(1, 40),
    depth=st.integers(0, 6),
    batch=st.integers(0, 300),
    half=st.sampled_from(HALVES),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_fff_inference_matches_reference(in_w, leaf_w, out_w, depth, batch, half, act, seed):
    """Router-leaf FFF, both of its row orders (batches under and over 2 rows per leaf)."""
    rng = np.random.default_rng(seed)
    layer = fastff.FFF(in_w, leaf_w, out_w, depth, act, seed=seed)
    state = dyadic_state(layer, rng)
    half_layer = layer.astype(half)
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y = half_layer(x)
    assert y.dtype == np.float32 and y.shape == (batch, out_w)
    assert_close(y, R.fff_infer(x.astype(np.float64), state, act), np.float32, in_w + leaf_w, "y")


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_gaussian_data_error_is_the_formats_rounding(half):
    """Against the reference on the same (rounded) weights: float32 accumulation error only;
    against the float32 layer: within a few units of the format's roundoff per term."""
    rng = np.random.default_rng(0)
    layer = fastff.UltraFFF(96, 64, 7, 2, seed=3)
    half_layer = layer.astype(half)
    x = rng.standard_normal((500, 96)).astype(np.float32)
    y_ref, (_, z, mask) = R.ultra_forward(x.astype(np.float64), _widened(half_layer), 7, 2, "gelu")
    safe = ~((np.abs(z) < 1e-4) & (mask > 0)).any(axis=1)  # no decision within rounding of 0
    assert safe.mean() > 0.95
    y = half_layer(x)
    assert np.abs(y[safe] - y_ref[safe]).max() / np.abs(y_ref).max() < 1e-5
    # the float32 layer's reference: rows that route alike differ by the weights' rounding
    y32_ref, (_, z32, _) = R.ultra_forward(x.astype(np.float64), _widened(layer), 7, 2, "gelu")
    same = (np.sign(z) == np.sign(z32)).all(axis=1) & safe
    assert same.mean() > 0.5  # bfloat16 flips about one row in four somewhere on 16 decisions
    terms = 96 * 8 * 2
    bound = 4 * UNIT_ROUNDOFF[np.dtype(half)] * np.sqrt(terms) * np.abs(y32_ref).max()
    assert np.abs(y[same] - y32_ref[same]).max() < bound


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_large_batches_and_threads_give_the_same_bits(half, subtree_bytes):
    """The subtree-grouped path (large batches) and any thread count add each row's terms in
    the same order as a small batch: identical bits."""
    from fastff import _cmm

    subtree_bytes(1 << 14)  # 63-node subtrees of 176-byte nodes: regrouped at level 5
    assert _cmm._subtree_split(6000, 10, 48, 40, 2) == 5
    rng = np.random.default_rng(1)
    layer = fastff.UltraFFF(48, 40, 10, 2, seed=2).astype(half)
    x = rng.standard_normal((6000, 48)).astype(np.float32)
    with fastff.num_threads(1):
        y1 = layer(x)
    with fastff.num_threads(2):
        y2 = layer(x)
    pieces = np.concatenate([layer(x[i : i + 7]) for i in range(0, 6000, 7)])
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1, pieces)


def test_portable_and_vector_paths_agree():
    """FASTFF_HALF_PORTABLE=1 forces the scalar loops (machines without AVX2/F16C): same
    routing, outputs equal to float32 summation-order rounding."""
    code = (
        "import json, sys, numpy as np, fastff\n"
        "out = {}\n"
        "for dt in ('bfloat16', 'float16'):\n"
        "    x = np.random.default_rng(5).standard_normal((300, 37)).astype(np.float32)\n"
        "    ultra = fastff.UltraFFF(37, 53, 6, 2, seed=4).astype(dt)\n"
        "    fff = fastff.FFF(37, 19, 53, 4, seed=4).astype(dt)\n"
        "    out[dt] = [ultra(x).tolist(), fff(x).tolist(), fff(x[:5]).tolist()]\n"
        "json.dump(out, sys.stdout)\n"
    )
    results = []
    for portable in ("0", "1"):
        env = {k: v for k, v in os.environ.items() if k != "FASTFF_HALF_PORTABLE"}
        if portable == "1":
            env["FASTFF_HALF_PORTABLE"] = "1"
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    for dt in ("bfloat16", "float16"):
        for vector, portable in zip(results[0][dt], results[1][dt]):
            np.testing.assert_allclose(vector, portable, rtol=1e-5, atol=1e-5, err_msg=dt)


def test_conversion_round_trips_and_rounds_to_nearest():
    layer = fastff.UltraFFF(8, 5, 2, seed=0)
    half = layer.astype("bfloat16")
    state = layer.state_dict()
    for k, v in half.state_dict().items():
        np.testing.assert_array_equal(v, state[k].astype(BF16), err_msg=k)
    back = half.astype(np.float32)
    assert back.dtype == np.float32
    for k, v in back.state_dict().items():
        np.testing.assert_array_equal(v, state[k].astype(BF16).astype(np.float32), err_msg=k)
    # the layer is a copy: converting leaves the original alone
    np.testing.assert_array_equal(layer.state_dict()["linear_in.weight"], state["linear_in.weight"])
    # a float32 state dict loads into a half layer rounded; float16's range is checked
    f16 = fastff.UltraFFF(8, 5, 2, dtype=np.float16, seed=0)
    before = f16.state_dict()
    big = {k: v.astype(np.float32) for k, v in before.items()}
    big["linear_in.bias"] = big["linear_in.bias"] + 1e6
    with pytest.raises(ValueError, match="beyond the range of float16 .*wider dtype"):
        f16.load_state_dict(big)
    for k, v in f16.state_dict().items():  # nothing changed
        np.testing.assert_array_equal(v, before[k])
    seq = fastff.nn.Sequential(fastff.UltraFFF(8, 8, 2, seed=0), fastff.nn.ReLU())
    assert seq.astype("bfloat16")[0].dtype == BF16


def test_half_precision_errors_name_the_supported_dtypes():
    with pytest.raises(TypeError, match="'bfloat16' or numpy.float16, got 'bfloat8'"):
        fastff.UltraFFF(4, 4, 1, dtype="bfloat8")
    with pytest.raises(TypeError, match="numpy.float32, numpy.float64, 'bfloat16'"):
        fastff.UltraFFF(4, 4, 1, seed=0).astype("half-ish")
    with pytest.raises(TypeError, match="numpy.float16, got int8"):
        fastff.nn.Linear(4, 4, dtype=np.int8)
    for other in ("int32", np.longdouble, int, "float8"):
        with pytest.raises(TypeError, match="numpy.float32, numpy.float64, 'bfloat16'"):
            fastff.UltraFFF(4, 4, 1, dtype=other)
    for layer in (
        fastff.UltraFFF(4, 4, 1, seed=0),
        fastff.FFF(4, 2, 4, 1, seed=0),
        fastff.nn.Linear(4, 4, seed=0),
    ):
        half = layer.astype("bfloat16")
        with pytest.raises(TypeError, match="half-precision layers are for inference"):
            half.forward_train(np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_safetensors_round_trip_is_bit_exact(tmp_path, half):
    layer = fastff.UltraFFF(24, 16, 4, 2, seed=0).astype(half)
    path = tmp_path / "layer.safetensors"
    fastff.save(layer, path)
    loaded = fastff.load(path)
    assert loaded.dtype == half
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k].view(np.uint16), v.view(np.uint16))
    header = json.loads(path.read_bytes()[8 : 8 + int.from_bytes(path.read_bytes()[:8], "little")])
    names = {BF16: "BF16", np.dtype(np.float16): "F16"}
    assert {header[k]["dtype"] for k in layer.state_dict()} == {names[np.dtype(half)]}


def test_npz_refuses_bfloat16_and_keeps_float16(tmp_path):
    with pytest.raises(TypeError, match="no bfloat16 type"):
        fastff.save(fastff.UltraFFF(4, 4, 1, seed=0).astype("bfloat16"), tmp_path / "x.npz")
    assert not (tmp_path / "x.npz").exists()
    layer = fastff.UltraFFF(4, 4, 1, seed=0).astype(np.float16)
    fastff.save(layer, tmp_path / "y.npz")
    np.testing.assert_array_equal(
        fastff.load(tmp_path / "y.npz").state_dict()["linear_in.weight"],
        layer.state_dict()["linear_in.weight"],
    )


def test_reference_safetensors_reads_bf16_with_the_anchor_keys(tmp_path):
    safetensors = pytest.importorskip("safetensors")
    layer = fastff.UltraFFF(12, 10, 3, 2, seed=0).astype("bfloat16")
    path = tmp_path / "layer.safetensors"
    fastff.save(layer, path)
    with safetensors.safe_open(str(path), framework="np") as f:
        keys = set(f.keys())
        dtypes = {k: f.get_slice(k).get_dtype() for k in keys}
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    state = layer.state_dict()
    assert keys == set(state)
    assert set(dtypes.values()) == {"BF16"}
    assert shapes == {k: v.shape for k, v in state.items()}
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    for k, v in state.items():
        assert tensors[k].dtype == torch.bfloat16
        np.testing.assert_array_equal(
            tensors[k].view(torch.int16).numpy().view(np.uint16), v.view(np.uint16)
        )


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_built_in_half_equals_the_float32_layer_rounded(half):
    """A layer built in half precision draws what the float32 layer draws, rounded: the bench
    builds deep half trees directly, without a float32 copy twice their size."""
    for make in (
        lambda dt: fastff.UltraFFF(33, 17, 5, 2, seed=7, dtype=dt),
        lambda dt: fastff.FFF(33, 4, 17, 3, seed=7, dtype=dt),
    ):
        direct, rounded = make(half).state_dict(), make(np.float32).astype(half).state_dict()
        for k, v in rounded.items():
            np.testing.assert_array_equal(direct[k].view(np.uint16), v.view(np.uint16))


@given(
    in_w=st.integers(1, 300),
    out_w=st.integers(1, 60),
    batch=st.integers(0, 70),
    bias=st.booleans(),
    half=st.sampled_from(HALVES),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_linear_is_the_float32_linear_on_the_widened_weights(
    in_w, out_w, batch, bias, half, seed
):
    """nn.Linear stored in half precision computes what a float32 Linear holding the same
    (exactly widened) weights computes, bit for bit, and stays within the float32 GEMM's
    rounding of the float64 product."""
    rng = np.random.default_rng(seed)
    half_layer = fastff.nn.Linear(in_w, out_w, bias, seed=seed).astype(half)
    assert half_layer.dtype == half and half_layer.compute_dtype == np.float32
    widened = fastff.nn.Linear(in_w, out_w, bias, seed=seed)
    widened.load_state_dict({k: v.astype(np.float32) for k, v in half_layer.state_dict().items()})
    x = rng.standard_normal((batch, in_w)).astype(np.float32)
    y = half_layer(x)
    assert y.dtype == np.float32 and y.shape == (batch, out_w)
    np.testing.assert_array_equal(y, widened(x))
    w = _widened(half_layer)
    y_ref = x.astype(np.float64) @ w["weight"].T + (w["bias"] if bias else 0.0)
    scale = np.abs(x.astype(np.float64)) @ np.abs(w["weight"]).T + 1.0
    assert np.all(np.abs(y - y_ref) <= 2 * (in_w + 1) * 2.0**-24 * scale)


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_a_whole_model_converts_and_round_trips(tmp_path, half):
    """Sequential.astype converts every layer (Linear, UltraFFF) and .safetensors keeps the
    bits; the converted model's output is within the format's rounding of the float32 one."""
    model = fastff.nn.Sequential(
        fastff.nn.Linear(20, 32, seed=0),
        fastff.nn.GELU(),
        fastff.UltraFFF(32, 16, 3, 2, seed=1),
        fastff.nn.Linear(16, 5, seed=2),
    )
    converted = model.astype(half)
    assert [m.dtype for m in converted.layers] == [half, None, half, half]
    x = np.random.default_rng(3).standard_normal((40, 20)).astype(np.float32)
    y, y32 = converted(x), model(x)
    assert y.dtype == np.float32
    assert np.abs(y - y32).max() <= 16 * UNIT_ROUNDOFF[np.dtype(half)] * np.abs(y32).max()
    path = tmp_path / "model.safetensors"
    fastff.save(converted, path)
    loaded = fastff.load(path)
    for k, v in converted.state_dict().items():
        np.testing.assert_array_equal(loaded.state_dict()[k].view(np.uint16), v.view(np.uint16))
    np.testing.assert_array_equal(loaded(x), y)


@pytest.mark.parametrize("half", HALVES, ids=IDS)
def test_optimizers_refuse_half_models(half):
    """Adam's float16 state would underflow eps to zero and turn every weight into NaN."""
    models = [
        fastff.nn.Linear(5, 3, seed=0).astype(half),
        fastff.nn.Sequential(
            fastff.nn.Linear(5, 4, seed=0), fastff.nn.ReLU(), fastff.UltraFFF(4, 3, 2, seed=1)
        ).astype(half),
    ]
    for model in models:
        before = {k: v.view(np.uint16).copy() for k, v in model.state_dict().items()}
        for make in (fastff.optim.SGD, fastff.optim.Adam, fastff.optim.AdamW):
            with pytest.raises(TypeError, match="half-precision layers are for inference"):
                make(model, 1e-3)
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(v.view(np.uint16), before[k])


def test_moving_to_a_device_that_cannot_hold_bfloat16_says_so_and_moves_nothing(monkeypatch):
    """CuPy before 14 has no bfloat16: Module.to refuses before any parameter moves (a stand-in
    device here; tests/test_gpu.py moves half layers to a real GPU)."""
    import fastff.module

    class NoBfloat16:
        xp = object()  # not NumPy: a device

        def asarray(self, a, dtype=None):
            if np.asarray(a).dtype == BF16:
                raise TypeError("Unsupported dtype bfloat16")
            raise AssertionError("nothing may move before the dtype check")

    real = fastff.module.get_ops
    monkeypatch.setattr(
        fastff.module, "get_ops", lambda device: real(device) if device == "cpu" else NoBfloat16()
    )
    model = fastff.nn.Sequential(fastff.nn.Linear(8, 8, seed=0), fastff.FFF(8, 2, 4, 1, seed=0))
    half = model.astype("bfloat16")
    state = half.state_dict()
    with pytest.raises(TypeError, match="bfloat16 on CUDA needs CuPy 14"):
        half.to("cuda")
    assert all(m.device == "cpu" for m in half.modules())
    for k, v in half.state_dict().items():
        np.testing.assert_array_equal(v.view(np.uint16), state[k].view(np.uint16))
