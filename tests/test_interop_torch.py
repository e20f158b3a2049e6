"""fastff.interop against PyTorch modules: UltraFastBERT's FFF, written here in torch from
DESIGN.md section 1 (its package is not on PyPI), and the `fastfeedforward` package when it is
installed. Skipped without torch."""

import numpy as np
import pytest

import fastff
from fastff import nn, reference
from fastff.interop import fff_from_torch, to_torch_state_dict, ultra_from_torch

torch = pytest.importorskip("torch")


# ---- UltraFastBERT's FFF, written in torch -----------------------------------------------------


class TorchUltraFFF(torch.nn.Module):
    """UltraFastBERT's intermediate FFF as DESIGN.md section 1 gives it: the dense masked
    forward `(act(Z) * M) W_out^T`. Autograd through it is the hard-path backward, since the
    mask M is a constant."""

    def __init__(self, input_width, output_width, depth, parallel_size, activation=torch.nn.GELU):
        super().__init__()
        self.input_width, self.output_width = input_width, output_width
        self.depth, self.parallel_size = depth, parallel_size
        self.n_nodes = 2 ** (depth + 1) - 1
        self.linear_in = torch.nn.Linear(input_width, parallel_size * self.n_nodes, bias=True)
        self.linear_out = torch.nn.Linear(parallel_size * self.n_nodes, output_width, bias=False)
        self.activation = activation()

    def forward(self, x):
        rows = x.reshape(-1, self.input_width)
        z = self.linear_in(rows)
        z_trees = z.detach().view(-1, self.parallel_size, self.n_nodes)
        mask = torch.zeros_like(z_trees)
        node = torch.zeros(z_trees.shape[:2], dtype=torch.long)
        for _ in range(self.depth + 1):
            mask.scatter_(2, node.unsqueeze(-1), 1.0)
            z_node = z_trees.gather(2, node.unsqueeze(-1)).squeeze(-1)
            node = 2 * node + 1 + (z_node > 0).long()
        y = self.linear_out(self.activation(z) * mask.view_as(z))
        return y.view(*x.shape[:-1], self.output_width)


def _torch_rng(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ultra_from_torch_module_matches_forward_and_gradients(dtype, rtol):
    torch.manual_seed(0)
    module = TorchUltraFFF(12, 7, depth=3, parallel_size=2).to(dtype)
    layer = ultra_from_torch(module)
    assert (layer.depth, layer.parallel_size, layer.activation) == (3, 2, "gelu")
    assert layer.dtype == (np.float32 if dtype == torch.float32 else np.float64)

    x = torch.randn(2, 5, 12, generator=_torch_rng(1), dtype=dtype, requires_grad=True)
    dy = torch.randn(2, 5, 7, generator=_torch_rng(2), dtype=dtype)
    y_torch = module(x)
    (y_torch * dy).sum().backward()

    y, backprop = layer.forward_train(x.detach())
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(layer(x.detach()), y, rtol=rtol, atol=rtol)
    dx = backprop(dy)
    np.testing.assert_allclose(dx, x.grad.numpy(), rtol=rtol, atol=rtol)
    torch_grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    assert set(torch_grads) == set(layer.grads)
    for name, grad in layer.grads.items():
        np.testing.assert_allclose(grad, torch_grads[name], rtol=rtol, atol=rtol, err_msg=name)


def test_ultra_from_a_torch_state_dict_and_back():
    torch.manual_seed(3)
    module = TorchUltraFFF(8, 5, depth=2, parallel_size=3, activation=torch.nn.ReLU)
    with pytest.raises(ValueError, match="pass parallel_size= or depth="):
        ultra_from_torch(module.state_dict())
    layer = ultra_from_torch(module.state_dict(), depth=2, activation="relu")
    assert layer.parallel_size == 3
    x = torch.randn(6, 8, generator=_torch_rng(4))
    with torch.no_grad():
        np.testing.assert_allclose(layer(x), module(x).numpy(), rtol=1e-5, atol=1e-6)

    fresh = fastff.UltraFFF(8, 5, depth=2, parallel_size=3, activation="relu", seed=9)
    state = to_torch_state_dict(fresh)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    module.load_state_dict(state)  # strict: exactly UltraFastBERT's keys and shapes
    with torch.no_grad():
        np.testing.assert_allclose(fresh(x), module(x).numpy(), rtol=1e-5, atol=1e-6)


def test_activation_and_dtype_of_torch_modules():
    module = TorchUltraFFF(4, 3, depth=1, parallel_size=1, activation=torch.nn.Identity)
    assert ultra_from_torch(module).activation == "identity"
    module.activation = torch.nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="no fastff equivalent"):
        ultra_from_torch(module)
    assert ultra_from_torch(module, activation="gelu").activation == "gelu"
    module.activation = torch.nn.GELU()
    half = module.to(torch.bfloat16)  # kept in bfloat16 (ml_dtypes), bit for bit
    layer = ultra_from_torch(half)
    assert layer.dtype.name == "bfloat16" and layer.compute_dtype == np.float32
    back = to_torch_state_dict(layer)
    for key, tensor in half.state_dict().items():
        assert back[key].dtype == torch.bfloat16 and torch.equal(back[key], tensor), key
    wide = ultra_from_torch(half, dtype=np.float32)  # dtype= converts
    assert wide.dtype == np.float32
    np.testing.assert_array_equal(
        wide.state_dict()["linear_in.weight"], half.linear_in.weight.float().detach().numpy()
    )
    x = np.random.default_rng(1).standard_normal((7, 4)).astype(np.float32)
    # the same weights (widened exactly); the kernels sum in their own orders
    np.testing.assert_allclose(layer(x), wide(x), rtol=1e-5, atol=1e-6)


def test_a_state_dict_mixing_half_and_float32_loads_without_rounding():
    """Only a state dict that is all bfloat16 (or all float16) stays half: a float32 weight
    beside bfloat16 ones would otherwise be rounded; any float64 weight makes it float64."""
    torch.manual_seed(0)
    state = TorchUltraFFF(6, 4, depth=1, parallel_size=1).state_dict()
    state["linear_in.weight"] = state["linear_in.weight"].bfloat16()
    layer = ultra_from_torch(state, depth=1)
    assert layer.dtype == np.float32
    for key, tensor in state.items():
        np.testing.assert_array_equal(layer.state_dict()[key], tensor.float().numpy())
    state["linear_in.bias"] = state["linear_in.bias"].double()
    assert ultra_from_torch(state, depth=1).dtype == np.float64


@pytest.mark.parametrize("torch_dtype", ["bfloat16", "float16"])
def test_half_fff_state_dicts_stay_half(torch_dtype):
    torch_dtype = getattr(torch, torch_dtype)
    rng = _torch_rng(8)
    state = {
        "node_weights": torch.randn(3, 6, generator=rng),
        "node_biases": torch.randn(3, 1, generator=rng),
        "w1s": torch.randn(4, 6, 5, generator=rng),
        "b1s": torch.randn(4, 5, generator=rng),
        "w2s": torch.randn(4, 5, 2, generator=rng),
        "b2s": torch.randn(4, 2, generator=rng),
    }
    state = {k: v.to(torch_dtype) for k, v in state.items()}
    layer = fff_from_torch(state)
    assert layer.dtype.name == str(torch_dtype).removeprefix("torch.")
    back = to_torch_state_dict(layer)
    for key, tensor in state.items():
        assert back[key].dtype == torch_dtype and torch.equal(back[key], tensor), key
    x = np.random.default_rng(2).standard_normal((11, 6)).astype(np.float32)
    wide = fff_from_torch(state, dtype=np.float32)
    np.testing.assert_allclose(layer(x), wide(x), rtol=1e-5, atol=1e-5)


def test_fff_from_a_torch_state_dict_matches_the_reference():
    rng = _torch_rng(5)
    depth, n_in, leaf, n_out = 3, 6, 4, 5
    n_nodes, n_leaves = 2**depth - 1, 2**depth
    state = {
        "depth": torch.tensor(depth, dtype=torch.long),
        "node_weights": torch.randn(n_nodes, n_in, generator=rng),
        "node_biases": torch.randn(n_nodes, 1, generator=rng),
        "w1s": torch.randn(n_leaves, n_in, leaf, generator=rng),
        "b1s": torch.randn(n_leaves, leaf, generator=rng),
        "w2s": torch.randn(n_leaves, leaf, n_out, generator=rng),
        "b2s": torch.randn(n_leaves, n_out, generator=rng),
    }
    layer = fff_from_torch(state, activation="gelu")
    x = np.random.default_rng(6).standard_normal((9, n_in)).astype(np.float32)
    params = {k: v.numpy().astype(np.float64) for k, v in state.items() if k != "depth"}
    expected = reference.fff_infer(x.astype(np.float64), params, "gelu")
    np.testing.assert_allclose(layer(x), expected, rtol=1e-5, atol=1e-5)
    back = to_torch_state_dict(layer)
    assert back["depth"].dtype == torch.long and int(back["depth"]) == depth
    for key in state:
        assert torch.equal(back[key], state[key]), key


def test_nn_modules_give_torch_keys():
    model = nn.Sequential(nn.Linear(4, 3, seed=0), nn.ReLU(), fastff.FFF(3, 2, 2, depth=1))
    state = to_torch_state_dict(model)
    assert sorted(state) == [
        "0.bias",
        "0.weight",
        "2.b1s",
        "2.b2s",
        "2.depth",
        "2.node_biases",
        "2.node_weights",
        "2.w1s",
        "2.w2s",
    ]
    torch_linear = torch.nn.Linear(4, 3)
    torch_linear.load_state_dict({"weight": state["0.weight"], "bias": state["0.bias"]})
    x = torch.randn(2, 4, generator=_torch_rng(7))
    with torch.no_grad():
        np.testing.assert_allclose(model[0](x), torch_linear(x).numpy(), rtol=1e-6, atol=1e-6)


# ---- the `fastfeedforward` package (optional) --------------------------------------------------


@pytest.fixture
def fastfeedforward():
    return pytest.importorskip("fastfeedforward")


def _package_fff(fastfeedforward, seed, **kwargs):
    torch.manual_seed(seed)
    return fastfeedforward.FFF(10, 4, 6, 3, **kwargs)


def test_fff_from_the_package_module(fastfeedforward):
    module = _package_fff(fastfeedforward, 0, activation=torch.nn.GELU(), usage_mode="soft")
    with torch.no_grad():
        module.leaf_usage += torch.arange(8, dtype=torch.float)
    layer = fff_from_torch(module)
    assert (layer.input_width, layer.leaf_width, layer.output_width, layer.depth) == (10, 4, 6, 3)
    assert (layer.activation, layer.usage_mode) == ("gelu", "soft")
    np.testing.assert_array_equal(layer.leaf_usage, np.arange(8))

    x = torch.randn(32, 10, generator=_torch_rng(1))
    dy = torch.randn(32, 6, generator=_torch_rng(2))
    module.train()
    # Hard inference is the package's hardened training forward (which keeps b2s) ...
    with torch.no_grad():
        y_hard = module.training_forward(x, use_hard_decisions=True)
    np.testing.assert_allclose(layer(x), y_hard.numpy(), rtol=1e-5, atol=1e-5)
    # ... and its eval_forward leaves out the reached leaf's b2s.
    module.eval()
    with torch.no_grad():
        y_eval = module(x).numpy()
    state = layer.state_dict()
    z = x.numpy() @ state["node_weights"].T + state["node_biases"].T
    _, leaf = reference.fff_hard_paths(z, (z >= 0).astype(np.intp))
    np.testing.assert_allclose(layer(x) - state["b2s"][leaf], y_eval, rtol=1e-5, atol=1e-5)

    # Soft training: outputs and gradients of sum(y * dy).
    module.train()
    x.requires_grad_(True)
    y_soft = module.training_forward(x)
    (y_soft * dy).sum().backward()
    y, backprop = layer.forward_train(x.detach())
    np.testing.assert_allclose(y, y_soft.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(backprop(dy), x.grad.numpy(), rtol=1e-4, atol=1e-5)
    for name, grad in layer.grads.items():
        expected = getattr(module, name).grad.numpy()
        np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5, err_msg=name)


def test_to_torch_state_dict_loads_into_the_package(fastfeedforward):
    layer = fastff.FFF(10, 4, 6, 3, usage_mode="hard", seed=4)
    layer.forward_train(np.random.default_rng(0).standard_normal((16, 10)))
    module = _package_fff(fastfeedforward, 1, usage_mode="hard")
    module.load_state_dict(to_torch_state_dict(layer))  # strict
    assert float(module.leaf_usage.sum()) == 16
    module.train()
    x = torch.randn(20, 10, generator=_torch_rng(3))
    with torch.no_grad():
        y_hard = module.training_forward(x, use_hard_decisions=True)
    np.testing.assert_allclose(layer(x), y_hard.numpy(), rtol=1e-5, atol=1e-5)
