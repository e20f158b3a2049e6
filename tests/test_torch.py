"""fastff.torch: UltraFFF against a masked dense PyTorch UltraFastBERT FFF written here, FFF against
the `fastfeedforward` package (outputs, gradients, entropies, seeded masks), gradcheck in
float64, input errors as the NumPy layers', zero-copy, threads and torch.compile. Skipped
without torch; the package comparisons skip without fastfeedforward, the CUDA ones without a
GPU."""

import ast
import gc
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fastff
from fastff import reference
from fastff.backends import get_ops
from fastff.interop import fff_from_torch, ultra_from_torch

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastff.torch")

ACTS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "identity": torch.nn.Identity}
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _close(actual, expected, dtype=torch.float32, what=""):
    if expected is None:
        expected = torch.zeros_like(actual)
    torch.testing.assert_close(actual, expected, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# ---- UltraFastBERT's FFF, masked and dense (DESIGN.md section 1) -------------------------------


class MaskedUltraFFF(torch.nn.Module):
    """UltraFastBERT's training FFF: every neuron computed, then masked to each row's path."""

    def __init__(self, input_width, output_width, depth, parallel_size=1, activation="gelu"):
        super().__init__()
        self.depth, self.parallel_size, self.n_nodes = depth, parallel_size, 2 ** (depth + 1) - 1
        self.linear_in = torch.nn.Linear(input_width, parallel_size * self.n_nodes)
        self.linear_out = torch.nn.Linear(parallel_size * self.n_nodes, output_width, bias=False)
        self.activation = ACTS[activation]()

    def forward(self, x):
        z = self.linear_in(x.reshape(-1, x.shape[-1]))
        trees = z.detach().view(-1, self.parallel_size, self.n_nodes)
        mask, node = torch.zeros_like(trees), torch.zeros(trees.shape[:2], dtype=torch.long)
        for _ in range(self.depth + 1):
            mask.scatter_(2, node.unsqueeze(-1), 1.0)
            node = 2 * node + 1 + (trees.gather(2, node.unsqueeze(-1)).squeeze(-1) > 0).long()
        y = self.linear_out(self.activation(z) * mask.view_as(z))
        return y.view(*x.shape[:-1], -1)


def _ultra_pair(seed, dtype=torch.float32):
    """A random configuration: fastff.torch.UltraFFF and the masked module on the same weights."""
    rng = np.random.default_rng(seed)
    in_w, out_w = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    depth, trees = int(rng.integers(0, 6)), int(rng.integers(1, 4))
    act = str(rng.choice(list(ACTS)))
    module = ft.UltraFFF(in_w, out_w, depth, trees, act, dtype=dtype)
    dense = MaskedUltraFFF(in_w, out_w, depth, trees, act).to(dtype)
    dense.load_state_dict(module.state_dict())
    lead = tuple(int(n) for n in rng.integers(1, 5, size=int(rng.integers(1, 4))))
    x = torch.randn(*lead, in_w, generator=_gen(seed), dtype=dtype)
    return module, dense, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_ultra_matches_the_masked_dense_module(seed, dtype):
    torch.manual_seed(seed)
    module, dense, x = _ultra_pair(seed, dtype)
    with torch.no_grad():  # the inference kernel
        _close(module(x), dense(x), dtype, "inference")
    dy = torch.randn(*x.shape[:-1], module.output_width, generator=_gen(seed + 1), dtype=dtype)
    outputs = {}
    for name, m in (("fastff", module), ("dense", dense)):
        xg = x.clone().requires_grad_()
        y = m(xg)
        (y * dy).sum().backward()
        grads = {k: p.grad for k, p in m.named_parameters()}
        outputs[name] = (y.detach(), xg.grad, grads)
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = outputs["fastff"], outputs["dense"]
    _close(y, y_ref, dtype, "y")
    _close(dx, dx_ref, dtype, "dx")
    assert set(grads) == set(grads_ref)
    for key in grads:
        _close(grads[key], grads_ref[key], dtype, key)


@pytest.mark.parametrize("kind", ["ultra", "fff-soft", "fff-hardened"])
def test_parameter_gradients_do_not_depend_on_the_input_needing_one(kind):
    # an input without requires_grad (a first layer) skips the dx pass: same parameter grads
    torch.manual_seed(4)
    if kind == "ultra":
        module = ft.UltraFFF(30, 7, 4, 2)
    else:
        module = ft.FFF(30, 4, 7, 3, "gelu", 0.2, kind == "fff-hardened", 0.1)
    x = torch.randn(3, 11, 30, generator=_gen(5))
    grads = []
    for needs in (True, False):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(needs)
        torch.manual_seed(6)  # the same dropout and region-leak masks
        module(xi).square().sum().backward()
        assert (xi.grad is not None) == needs
        grads.append([p.grad.clone() for p in module.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) >= 3
    for with_dx, without_dx in zip(*grads):
        assert torch.equal(with_dx, without_dx)


def test_ultra_state_dict_is_ultrafastberts():
    module = ft.UltraFFF(6, 4, depth=2, parallel_size=3)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert shapes == {
        "linear_in.weight": (21, 6),
        "linear_in.bias": (21,),
        "linear_out.weight": (4, 21),
    }
    dense = MaskedUltraFFF(6, 4, 2, 3)
    module.load_state_dict(dense.state_dict())  # strict, both ways
    dense.load_state_dict(module.state_dict())
    # the kernels' layout survives loading: linear_out.weight stays a transposed view
    assert module.linear_out.weight.t().is_contiguous()
    assert torch.equal(module.linear_out.weight, dense.linear_out.weight)
    # UltraFastBERT's init bounds
    assert module.linear_in.weight.abs().max() <= 6**-0.5
    fresh = ft.UltraFFF(6, 4, depth=2, parallel_size=3)
    assert fresh.linear_out.weight.abs().max() <= (3 * 3) ** -0.5
    # fastff.interop reads the module like UltraFastBERT's
    layer = ultra_from_torch(fresh)
    x = torch.randn(5, 6)
    with torch.no_grad():
        np.testing.assert_allclose(layer(x), fresh(x).numpy(), rtol=1e-6, atol=1e-6)


def test_ultra_gradcheck_float64():
    torch.manual_seed(0)
    module = ft.UltraFFF(5, 4, depth=3, parallel_size=2, dtype=torch.float64)
    params = {k: p.detach().clone().requires_grad_() for k, p in module.named_parameters()}
    x = torch.randn(3, 2, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        return torch.func.functional_call(module, dict(zip(params, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params.values()))


# ---- the fastfeedforward package ---------------------------------------------------------------


@pytest.fixture
def fastfeedforward():
    return pytest.importorskip("fastfeedforward")


FFF_PARAMS = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")


def _fff_config(seed):
    rng = np.random.default_rng(seed)
    config = {
        "input_width": int(rng.integers(1, 12)),
        "leaf_width": int(rng.integers(1, 6)),
        "output_width": int(rng.integers(1, 8)),
        "depth": int(rng.integers(0, 5)),
    }
    act = str(rng.choice(list(ACTS)))
    mode = str(rng.choice(["soft", "hard-flag", "hard-attribute"]))
    lead = tuple(int(n) for n in rng.integers(1, 6, size=int(rng.integers(1, 3))))
    masks = {}
    if mode == "soft":  # seeded masks: the package's draws
        masks = {
            "region_leak": float(rng.choice([0.0, 0.3])),
            "dropout": float(rng.choice([0.0, 0.25])),
        }
    return config, act, mode, lead, masks


def _loss(out, seed):
    """sum(y * dy) (+ sum(entropies * de)) with fixed random weights."""
    outs = out if isinstance(out, tuple) else (out,)
    return sum(
        (o * torch.randn(o.shape, generator=_gen(seed + i))).sum() for i, o in enumerate(outs)
    )


@pytest.mark.parametrize("entropies", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_fff_matches_the_package(fastfeedforward, seed, entropies):
    config, act, mode, lead, masks = _fff_config(seed)
    hardened = mode == "hard-attribute"
    options = dict(train_hardened=hardened, **masks)
    torch.manual_seed(seed)
    package = fastfeedforward.FFF(**config, activation=ACTS[act](), **options)
    torch.manual_seed(seed)
    module = ft.FFF(**config, activation=act, **options)
    for key, value in package.state_dict().items():  # the same seeded init
        assert torch.equal(module.state_dict()[key], value), key
    x = torch.randn(*lead, config["input_width"], generator=_gen(seed + 100))
    results = []
    for m in (package, module):
        xg = x.clone().requires_grad_()
        torch.manual_seed(seed + 7)  # the same region-leak and dropout masks
        out = m.training_forward(
            xg, return_entropies=entropies, use_hard_decisions=mode == "hard-flag"
        )
        _loss(out, seed).backward()
        results.append((out, xg.grad, {k: getattr(m, k).grad for k in FFF_PARAMS}))
    (out_p, dx_p, g_p), (out_m, dx_m, g_m) = results
    if entropies:
        assert out_m[1].shape == (module.n_nodes,)
        _close(out_m[1], out_p[1], what="entropies")
        out_m, out_p = out_m[0], out_p[0]
    assert out_m.shape == out_p.shape
    _close(out_m, out_p, what="y")
    _close(dx_m, dx_p, what="dx")
    for key in FFF_PARAMS:
        _close(g_m[key], g_p[key], what=key)


def test_fff_eval_forward_and_forward(fastfeedforward):
    torch.manual_seed(3)
    package = fastfeedforward.FFF(10, 4, 6, 3, dropout=0.5, region_leak=0.5)
    module = ft.FFF(10, 4, 6, 3, dropout=0.5, region_leak=0.5)
    module.load_state_dict(package.state_dict())
    x = torch.randn(2, 9, 10, generator=_gen(4))
    package.eval(), module.eval()
    with torch.no_grad():
        y = module(x)
        assert torch.equal(y, module.eval_forward(x))
        # the package's hardened training forward (eval mode: no masks), b2s included ...
        _close(y, package.training_forward(x, use_hard_decisions=True), what="hard")
        # ... and its eval_forward, which leaves the reached leaf's b2s out
        state = module.state_dict()
        z = x.reshape(-1, 10) @ state["node_weights"].T + state["node_biases"].T
        _, leaf = reference.fff_hard_paths(z.numpy(), (z >= 0).numpy().astype(np.intp))
        b2 = state["b2s"][torch.from_numpy(leaf)].reshape(2, 9, 6)
        _close(y - b2, package(x), what="package eval")
        # fastff.FFF's inference, the same kernel
        np.testing.assert_array_equal(fff_from_torch(module)(x), y.numpy())
    # under autograd eval_forward runs the hard path's kernels: same values, leaf gradients
    xg = x.clone().requires_grad_()
    y_grad = module(xg)
    _close(y_grad, y, what="eval under autograd")
    y_grad.sum().backward()
    assert xg.grad.abs().sum() > 0 and module.node_weights.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="Cannot return entropies"):
        module(x, return_entropies=True)
    with pytest.raises(ValueError, match="Cannot use soft decisions"):
        module(x, use_hard_decisions=False)
    module.train()  # training mode: forward is training_forward, soft, with masks
    torch.manual_seed(5)
    y_soft = module(x)
    torch.manual_seed(5)
    package.train()
    _close(y_soft, package(x), what="training forward")


def test_fff_state_dict_is_the_packages(fastfeedforward):
    package = fastfeedforward.FFF(7, 3, 5, 2, usage_mode="soft")
    module = ft.FFF(7, 3, 5, 2, usage_mode="soft")
    assert [k for k, _ in module.named_parameters()] == [k for k, _ in package.named_parameters()]
    assert {k: v.shape for k, v in module.state_dict().items()} == {
        k: v.shape for k, v in package.state_dict().items()
    }
    module.load_state_dict(package.state_dict())  # strict, both ways
    package.load_state_dict(module.state_dict())
    assert module.w1s.transpose(1, 2).is_contiguous()  # the kernels' layout kept
    assert int(module.depth) == 2 and not module.depth.requires_grad
    group = module.get_leaf_param_group()
    assert group["usage"] is module.leaf_usage and group["params"][0] is module.w1s


@pytest.mark.parametrize("usage_mode", ["soft", "hard"])
@pytest.mark.parametrize("hardened", [False, True])
def test_fff_usage_counters_are_fastffs(usage_mode, hardened):
    module = ft.FFF(8, 3, 4, 3, train_hardened=hardened, usage_mode=usage_mode)
    layer = fff_from_torch(module)
    x = torch.randn(40, 8, generator=_gen(0))
    module.training_forward(x)
    module.training_forward(x[:10])
    layer.forward_train(x.numpy())
    layer.forward_train(x[:10].numpy())
    np.testing.assert_allclose(module.node_usage.numpy(), layer.node_usage, rtol=1e-6)
    np.testing.assert_allclose(module.leaf_usage.numpy(), layer.leaf_usage, rtol=1e-6)
    assert module.leaf_usage.sum() == pytest.approx(50, rel=1e-5)


def test_fff_hardened_masks_follow_the_reference():
    """Hardened training draws (B, depth) swaps then a (B, leaf) dropout mask: redrawn here with
    the same seed, the dense reference with those masks gives the module's output and grads."""
    depth, in_w, leaf_w, out_w, n = 3, 6, 4, 5, 30
    module = ft.FFF(in_w, leaf_w, out_w, depth, "gelu", 0.3, True, 0.4, dtype=torch.float64)
    x = torch.randn(n, in_w, generator=_gen(1), dtype=torch.float64, requires_grad=True)
    dy = torch.randn(n, out_w, generator=_gen(2), dtype=torch.float64)
    torch.manual_seed(9)
    (module.training_forward(x) * dy).sum().backward()
    torch.manual_seed(9)
    swap = (torch.empty(n, depth, dtype=torch.float64).uniform_(0, 1) < 0.4).numpy()
    drop = torch.nn.functional.dropout(torch.ones(n, leaf_w, dtype=torch.float64), 0.3).numpy()
    assert swap.any() and (drop == 0).any()
    params = {k: v.detach().numpy() for k, v in module.state_dict().items() if k != "depth"}
    level = np.concatenate([np.full(2**d, d) for d in range(depth)])  # each node's level
    y, _, cache = reference.fff_train_forward(
        x.detach().numpy(),
        params,
        "gelu",
        hardened=True,
        swap=swap[:, level],
        drop=np.repeat(drop[:, None, :], 2**depth, axis=1),
    )
    dx, grads = reference.fff_train_backward(dy.numpy(), cache, params, "gelu")
    with torch.no_grad():
        torch.manual_seed(9)
        np.testing.assert_allclose(module.training_forward(x).numpy(), y, rtol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-10, atol=1e-12)
    for key in FFF_PARAMS:
        np.testing.assert_allclose(
            getattr(module, key).grad.numpy(), grads[key], rtol=1e-10, atol=1e-12, err_msg=key
        )


@pytest.mark.parametrize("hardened", [False, True])
def test_fff_gradcheck_float64(hardened):
    torch.manual_seed(1)
    module = ft.FFF(5, 3, 4, 2, "gelu", train_hardened=hardened, dtype=torch.float64)
    names = list(FFF_PARAMS)
    values = [getattr(module, k).detach().clone().requires_grad_() for k in names]
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)

    def f(x, *values):
        state = dict(zip(names, values))
        return torch.func.functional_call(module, state, (x,), {"return_entropies": True})

    assert torch.autograd.gradcheck(f, (x, *values))


# ---- inputs, layout, threads, compile ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["ultra", "fff"])
def test_bad_inputs_raise_the_numpy_layers_errors(kind):
    if kind == "ultra":
        module = ft.UltraFFF(4, 3, 2)
        layer = ultra_from_torch(module)
    else:
        module = ft.FFF(4, 2, 3, 2)
        layer = fff_from_torch(module)
    bad = [
        torch.ones(2, 5),
        torch.ones(()),
        torch.ones(2, 4, dtype=torch.bool),
        torch.ones(2, 4, dtype=torch.complex64),
        torch.full((2, 4), 1e300, dtype=torch.float64),  # beyond float32
        torch.empty(2, 4, device="meta"),
    ]
    for x in bad:
        with pytest.raises((TypeError, ValueError)) as expected:
            layer(x)
        for call in (module, getattr(module, "training_forward", module)):
            with pytest.raises(expected.type) as got:
                call(x)
            assert str(got.value) == str(expected.value)
        module.eval()
        with torch.inference_mode(), pytest.raises(expected.type) as got:
            module(x)  # the cached inference path hands anything unusual to the checks
        assert str(got.value) == str(expected.value)
        module.train()
    module.half()
    with pytest.raises(ValueError, match="must be float32 or float64"):
        module(torch.ones(2, 4))
    with pytest.raises(ValueError, match="activation must be one of"):
        ft.UltraFFF(4, 3, 2, activation="tanh")
    with pytest.raises(ValueError, match="no fastff kernel"):
        ft.FFF(4, 2, 3, 2, activation=torch.nn.GELU(approximate="tanh"))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ft.FFF(4, 2, 3, 2, dropout=1.0)
    with pytest.raises(TypeError, match="runs on CPU and CUDA tensors"):
        ft.UltraFFF(4, 3, 2, device="meta")(torch.ones(2, 4))


def test_other_layouts_and_dtypes_are_accepted():
    torch.manual_seed(2)
    module = ft.UltraFFF(6, 5, 3, 2)
    base = torch.randn(6, 8, dtype=torch.float64)
    strided = base.t()  # (8, 6), not contiguous, float64: copied and cast, as NumPy does
    xg = strided.clone().requires_grad_()
    y = module(xg)
    y.sum().backward()
    assert xg.grad.dtype == torch.float64 and xg.grad.shape == (8, 6)
    ref = strided.float().contiguous().requires_grad_()
    y_ref = module(ref)
    y_ref.sum().backward()
    _close(y, y_ref)
    _close(xg.grad.float(), ref.grad)
    with torch.no_grad():  # integer and half inputs are cast
        _close(module(torch.arange(12).reshape(2, 6)), module(torch.arange(12.0).reshape(2, 6)))
        x16 = torch.randn(3, 6).to(torch.bfloat16)
        _close(module(x16), module(x16.float()))
    # a linear_out.weight replaced by a contiguous tensor still works (copied per call)
    with torch.no_grad():
        y0 = module(ref)
    module.linear_out.weight = torch.nn.Parameter(module.linear_out.weight.detach().contiguous())
    with torch.no_grad():
        _close(module(ref), y0)
    module(ref).sum().backward()
    assert module.linear_out.weight.grad.shape == (5, 30)


def _numpy_twin(module):
    """The NumPy layer with a copy of the module's current weights."""
    return (ultra_from_torch if isinstance(module, ft.UltraFFF) else fff_from_torch)(module)


@pytest.mark.parametrize("kind", ["ultra", "fff"])
def test_inference_keeps_parameter_views_and_sees_every_change(kind):
    # Without autograd the modules keep their parameters' kernel arrays between calls; every
    # way of changing a parameter must show in the next call, never a stale result.
    torch.manual_seed(6)
    if kind == "ultra":
        module = ft.UltraFFF(4, 5, 3, 2).eval()
        replace = ("linear_in", "weight")
    else:  # input width == leaf width: w1s can be re-strided in place, same address and shape
        module = ft.FFF(4, 4, 5, 3).eval()
        replace = ("", "node_weights")
    x = torch.randn(2, 7, 4, generator=_gen(7))
    cache = ft._INFERENCE_ARRAYS

    def check(module, what):
        with torch.inference_mode():
            y = module(x)
        dtype = next(p.dtype for p in module.parameters() if p.is_floating_point())
        np.testing.assert_allclose(
            y.numpy(),
            _numpy_twin(module)(x.to(dtype).numpy()),
            rtol=1e-5,
            atol=1e-6,
            err_msg=what,
        )
        return y

    y0 = check(module, "first call")
    assert module in cache
    entry = cache[module]
    y1 = check(module, "second call")
    assert cache[module] is entry and torch.equal(y0, y1)  # reused, not rebuilt
    with torch.no_grad():  # in place: the views see it
        for p in module.parameters():
            if p.is_floating_point():
                p.mul_(1.5).add_(0.25)
    assert not torch.allclose(check(module, "updated in place"), y0)
    owner = module.get_submodule(replace[0]) if replace[0] else module
    old = getattr(owner, replace[1])
    setattr(owner, replace[1], torch.nn.Parameter(torch.randn_like(old)))
    check(module, "parameter replaced")
    # a training call drops the entry: the views must not keep replaced parameters alive
    check(module, "before a training call")
    assert module in cache
    module.train()
    with torch.enable_grad():
        module(x).sum().backward()
    assert module not in cache
    module.eval()
    check(module, "cached again")
    assert module in cache
    # parameters that need a copy per call (a checkpoint in the anchors' contiguous layout)
    other = (ft.UltraFFF(4, 5, 3) if kind == "ultra" else ft.FFF(4, 4, 5, 3)).eval()
    check(other, "the kernels' layout")
    assert other in cache
    other.load_state_dict({k: v.contiguous() for k, v in other.state_dict().items()}, assign=True)
    check(other, "contiguous parameters")
    assert other not in cache
    if kind == "fff":  # the same storage seen through other strides: w1s transposed
        module.w1s.data = module.w1s.data.transpose(1, 2)
        assert module.w1s.data_ptr() == cache[module][0][2][0]
        check(module, "same address, other strides")
        with torch.no_grad():  # now a copy per call: an update must still show
            module.w1s.mul_(-1.0)
        check(module, "copied layout updated in place")
    module.double()
    assert module not in cache  # .to() and friends drop the old views
    check(module, "after .double()")
    state = module.state_dict()
    module.load_state_dict({k: v * 2 if v.is_floating_point() else v for k, v in state.items()})
    check(module, "after load_state_dict")
    fresh = (ft.UltraFFF(4, 5, 3) if kind == "ultra" else ft.FFF(4, 4, 5, 3)).eval()
    with torch.inference_mode():
        fresh(x)
    entries = len(cache)
    assert fresh in cache
    key, (_, _, arrays) = cache[fresh]
    assert [a.ctypes.data for a in arrays] == [k[0] for k in key]  # views of the keyed tensors
    del fresh
    gc.collect()
    assert len(cache) == entries - 1  # weakly keyed: gone with the module


@given(
    kind=st.sampled_from(["ultra", "fff"]),
    in_w=st.integers(1, 40),
    hidden=st.integers(1, 12),
    out_w=st.integers(1, 40),
    depth=st.integers(0, 6),
    lead=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    act=st.sampled_from(sorted(ACTS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_cached_inference_is_the_general_paths(
    kind, in_w, hidden, out_w, depth, lead, dtype, act, seed
):
    # the cached inference path (views kept between calls) against the general one it skips:
    # the same kernel on the same arrays, so bitwise the same output, shape and dtype
    torch.manual_seed(seed)
    if kind == "ultra":
        module = ft.UltraFFF(in_w, out_w, depth, 1 + hidden % 3, act, dtype=dtype)
        skip = "_ultra_infer"
    else:
        module = ft.FFF(in_w, hidden, out_w, max(depth, 1), act, dtype=dtype)
        skip = "_fff_infer"
    module.eval()
    x = torch.randn(*lead, in_w, dtype=dtype, generator=_gen(seed))
    with torch.inference_mode():
        cached = [module(x) for _ in range(2)]  # builds the entry, then uses it
    original = getattr(ft, skip)
    setattr(ft, skip, lambda module, x: None)
    try:
        with torch.inference_mode():
            general = module(x)
    finally:
        setattr(ft, skip, original)
    for y in cached:
        assert y.shape == general.shape and y.dtype == general.dtype
        assert torch.equal(y, general)


def test_inference_of_an_unhashable_subclass():
    # a subclass defining __eq__ loses __hash__: no cache then, but the same results
    class Compared(ft.UltraFFF):
        def __eq__(self, other):
            return isinstance(other, Compared)

    module = Compared(4, 5, 3).eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = module(x)
    np.testing.assert_allclose(y.numpy(), _numpy_twin(module)(x.numpy()), rtol=1e-5, atol=1e-6)
    module.double()  # Module._apply drops nothing, and does not fail


def test_cpu_tensors_are_not_copied(monkeypatch):
    ops = get_ops("cpu")
    seen = {}
    original = ops.ultra_forward

    def spy(x, p, *args):
        y, visited, preact = original(x, p, *args)
        seen.update(x=x, p=p, y=y)
        return y, visited, preact

    monkeypatch.setattr(ops, "ultra_forward", spy)
    module = ft.UltraFFF(8, 4, 3)
    x = torch.randn(5, 8, requires_grad=True)
    y = module(x)
    assert seen["x"].ctypes.data == x.data_ptr()
    assert seen["y"].ctypes.data == y.data_ptr()
    assert seen["p"]["w_out_t"].ctypes.data == module.linear_out.weight.data_ptr()
    assert seen["p"]["w_in"].ctypes.data == module.linear_in.weight.data_ptr()
    y.sum().backward()
    # the gradient keeps the parameter's layout (accumulated without a copy)
    assert module.linear_out.weight.grad.stride() == module.linear_out.weight.stride()
    with torch.inference_mode():  # the cached inference path: views too
        for _ in range(2):
            y = module(x.detach())
            assert seen["x"].ctypes.data == x.data_ptr()
            assert seen["y"].ctypes.data == y.data_ptr()
            assert seen["p"]["w_out_t"].ctypes.data == module.linear_out.weight.data_ptr()


def test_thread_count_is_fastffs_capped_by_torchs(monkeypatch):
    ops = get_ops("cpu")
    counts = []
    original = ops._run

    def spy(kernel, *args):
        counts.append(args[-1])
        return original(kernel, *args)

    monkeypatch.setattr(ops, "_run", spy)
    module = ft.UltraFFF(8, 4, 3)
    x = torch.randn(5, 8, requires_grad=True)
    torch_threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with fastff.num_threads(2):
            module(x).sum().backward()  # forward and backward kernels
        assert counts == [2, 2]
        counts.clear()
        with fastff.num_threads(5):
            module(x)
        assert counts == [3]
        counts.clear()
        torch.set_num_threads(1)
        with fastff.num_threads(4):
            module(x)
        assert counts == [1]
    finally:
        torch.set_num_threads(torch_threads)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear, self.ultra, self.fff = (
            torch.nn.Linear(6, 6),
            ft.UltraFFF(6, 6, 3),
            ft.FFF(6, 2, 3, 2),
        )

    def forward(self, x):
        return self.fff(torch.relu(self.ultra(self.linear(x)))) * 2


def test_one_openmp_runtime_serves_torch_and_fastff():
    """The docstring's claim: torch's libgomp and the one fastff links share a soname, so the
    process maps one of them, whichever loaded first. Checked in a fresh process holding only
    the two, in both import orders (other packages in this one, scikit-learn among them, bring
    their own copies under other sonames)."""
    code = (
        "import sys\n"
        "first, second = sys.argv[1:]\n"
        "mods = {name: __import__(name) for name in (first, second)}\n"
        "import torch, fastff.torch as ft\n"
        "torch.ones(64, 64) @ torch.ones(64, 64)\n"
        "ft.UltraFFF(4, 3, 2)(torch.ones(300, 4))\n"
        "maps = open('/proc/self/maps').read()\n"
        "print(sorted({l.split()[-1] for l in maps.splitlines() if 'libgomp' in l}))\n"
    )
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    for order in (("torch", "fastff"), ("fastff", "torch")):
        done = subprocess.run(
            [sys.executable, "-c", code, *order], capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        paths = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        if not paths:
            pytest.skip("neither torch nor fastff uses libgomp here")
        assert len(paths) == 1, (order, paths)


def test_torch_compile_breaks_the_graph_at_fastff():
    torch.manual_seed(4)
    model = _Model()
    x = torch.randn(4, 6, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    graphs = []

    def backend(gm, example_inputs):  # records what Dynamo captured, runs it as traced
        graphs.append([node.target for node in gm.graph.nodes if node.op == "call_function"])
        return gm.forward

    torch._dynamo.reset()
    xc = x.detach().clone().requires_grad_()
    y = torch.compile(model, backend=backend)(xc)
    y.sum().backward()
    _close(y, expected)
    _close(xc.grad, x.grad)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        _close(p.grad, g)
    # the rest was compiled, in graphs split at the two fastff modules (which run eagerly)
    captured = [" ".join(str(t) for t in graph) for graph in graphs]
    assert len(captured) == 3
    assert "linear" in captured[0] and "relu" in captured[1] and "mul" in captured[2]


def test_double_backward_is_refused():
    module = ft.UltraFFF(4, 3, 2, dtype=torch.float64)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    (dx,) = torch.autograd.grad((module(x) ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # not a silent zero
        dx.sum().backward()


def test_encoder_benchmark_runs(tmp_path):
    """benchmarks/encoder.py at a toy size: the table's rows and the split add up."""
    out = tmp_path / "encoder.json"
    args = "--layers 2 --hidden 16 --heads 2 --intermediate 32 --depth 3 --seq 4 --repeat 1"
    subprocess.run(
        [sys.executable, "benchmarks/encoder.py", *args.split(), "--json", str(out)],
        check=True,
        capture_output=True,
        cwd=pathlib.Path(__file__).parent.parent,
        timeout=300,
    )
    results = json.loads(out.read_text())["results"]
    assert [row["batch"] for row in results] == [1, 8]
    for row in results:
        for kind in ("dense", "fff"):
            t = row[kind]
            assert 0 < t["attention_s"] + t["ff_s"] <= t["total_s"]
        assert row["ff_speedup"] == row["dense"]["ff_s"] / row["fff"]["ff_s"]


def test_import_fastff_needs_no_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, fastff\n"
        "fastff.UltraFFF(4, 2, 1)(np.ones((1, 4)))\n"
        "try:\n    import fastff.torch\nexcept ImportError:\n    pass\n"
        "else:\n    raise SystemExit('fastff.torch imported without torch')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- CUDA: DLPack to CuPy on torch's stream (skipped without a GPU) -----------------------------


def _cuda_available():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_available(), reason="needs CUDA torch, CuPy and a GPU")
@pytest.mark.parametrize("kind", ["ultra", "fff-soft", "fff-hard"])
def test_cuda_matches_cpu(kind):
    torch.manual_seed(6)
    if kind == "ultra":
        cpu = ft.UltraFFF(32, 16, 4, 2)
    else:
        cpu = ft.FFF(32, 4, 16, 3, train_hardened=kind == "fff-hard")
    import copy

    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(64, 32)
    results = []
    for m, device in ((cpu, "cpu"), (gpu, "cuda")):
        xg = x.to(device).requires_grad_()
        y = m(xg)
        y.sum().backward()
        grads = {k: p.grad.cpu() for k, p in m.named_parameters() if p.grad is not None}
        results.append((y.detach().cpu(), xg.grad.cpu(), grads))
    (y, dx, g), (y_gpu, dx_gpu, g_gpu) = results
    _close(y_gpu, y)
    _close(dx_gpu, dx)
    for key in g:
        _close(g_gpu[key], g[key], what=key)
    with pytest.raises(TypeError, match="is a CUDA array but the layer is on 'cpu'"):
        cpu(x.cuda())
