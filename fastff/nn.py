"""Building blocks for NumPy training scripts: Linear, activations, Dropout, Sequential, losses.

Every module follows the protocol of the fastff layers:

- ``module(x)`` is inference;
- ``module.forward_train(x) -> (y, backprop)`` keeps what the backward pass needs;
- ``backprop(dy) -> dx`` adds the parameter gradients into ``module.grads``;
- ``module.forward_train(x, input_grad=False)``: x needs no gradient (a model's input), and
  backprop returns None without computing it.

The code only uses ``self.ops.xp`` (NumPy on "cpu", CuPy on "cuda"), so the same modules run on
either device once moved with ``.to()``.
"""

from __future__ import annotations

import inspect
import math

import numpy as np

from ._validation import (
    HALF_DTYPES,
    as_compute_float,
    as_float_array,
    as_rows,
    check_bool,
    check_fits_in_memory,
    check_int,
    check_probability,
    compute_dtype,
    refuse_masked,
)
from .layers import _checked, _fixed, _uniform
from .module import Module, caller_input, keep_for_backward, run_once
from .ops import get_array_module


def _check_grad_shape(dy, like, xp):
    """dy as an array of like's dtype; its shape must be the shape of the forward output."""
    dy = as_float_array(dy, xp, name="dy")
    if dy.shape != like.shape:
        raise ValueError(f"dy must have the shape of y, {tuple(like.shape)}, got {tuple(dy.shape)}")
    return dy.astype(like.dtype, copy=False)


def _widen(a):
    """a as float32 when it holds half-precision storage (exact: every bfloat16 and float16
    value is a float32 value), else a itself."""
    return a.astype(np.float32) if a.dtype in HALF_DTYPES else a


# ---- Linear --------------------------------------------------------------------------------


class Linear(Module):
    """y = x @ weight.T + bias, with x (..., input_width) -> y (..., output_width).

    Parameters (state_dict, PyTorch layout): ``weight`` (output_width, input_width) and, with
    ``bias=True``, ``bias`` (output_width,). Initialised like ``torch.nn.Linear``: both drawn
    from U(-1/sqrt(input_width), 1/sqrt(input_width)).

    ``dtype`` float32 or float64, or for inference the half-precision storage types "bfloat16"
    and numpy.float16 (``layer.astype``): the weights stay in 16 bits and each call widens them
    to a float32 copy for a float32 GEMM (exact; it halves the memory at rest, not the time:
    at small batches the copy makes it slower than float32).
    """

    input_width = _fixed("input_width", "Width of the input rows.")
    output_width = _fixed("output_width", "Width of the output rows.")
    has_bias = _fixed("has_bias", "Whether the layer adds a bias.")

    def __init__(self, input_width, output_width, bias=True, *, dtype=np.float32, seed=None):
        super().__init__(dtype, half=True)
        self._input_width = check_int(input_width, "input_width", 1)
        self._output_width = check_int(output_width, "output_width", 1)
        if not isinstance(bias, (bool, np.bool_)):
            raise TypeError(f"bias must be True or False, got {type(bias).__name__} {bias!r}")
        self._has_bias = bool(bias)
        check_fits_in_memory(
            (self.input_width + self.has_bias) * self.output_width * self.dtype.itemsize,
            f"Linear({self.input_width}, {self.output_width}) parameters",
        )
        rng = np.random.default_rng(seed)
        bound = 1.0 / math.sqrt(self.input_width)
        weight = _uniform(rng, (self.output_width, self.input_width), bound, self.dtype)
        # Kept transposed, (in, out): the forward x @ weight_t and both backward products are
        # plain GEMMs on contiguous operands.
        self._params = {"weight_t": np.ascontiguousarray(weight.T)}
        self._anchor = {"weight": ("weight_t", (1, 0))}
        if self.has_bias:
            self._params["bias"] = _uniform(rng, (self.output_width,), bound, self.dtype)
            self._anchor["bias"] = ("bias", None)

    def __repr__(self):
        return (
            f"Linear({self.input_width}, {self.output_width}, bias={self.has_bias}, "
            f"dtype={self.dtype.name}, device={self.device!r})"
        )

    def get_config(self) -> dict:
        return {
            "input_width": self.input_width,
            "output_width": self.output_width,
            "bias": self.has_bias,
            "dtype": self.dtype.name,
        }

    def _forward(self, x):
        rows, lead = as_rows(x, self.input_width, self.compute_dtype, self.ops.xp)
        y = rows @ _widen(self._params["weight_t"])
        if self.has_bias:
            y += _widen(self._params["bias"])
        return rows, lead, y

    def __call__(self, x):
        """x (..., input_width) -> y (..., output_width)."""
        _, lead, y = self._forward(x)
        return y.reshape(lead + (self.output_width,))

    def forward_train(self, x, *, input_grad=True):
        """Returns (y, backprop); keeps x (as rows) for the weight gradient. Without input_grad
        (x is the model's input) backprop returns None and skips dx's product."""
        self._check_trainable("forward_train")
        input_grad = check_bool(input_grad, "input_grad")
        rows, lead, y = self._forward(x)
        rows = keep_for_backward(rows, x)
        version, device, out_shape = self._version, self.device, lead + (self.output_width,)

        @run_once
        def backprop(dy):
            """dy (..., output_width) -> dx (..., input_width); adds into grads."""
            dy_rows, grads = self._backprop_inputs(dy, version, device, lead, self.output_width)
            grads["weight_t"] += rows.T @ dy_rows
            if self.has_bias:
                grads["bias"] += dy_rows.sum(axis=0)
            if not input_grad:
                return None
            dx = dy_rows @ self._params["weight_t"].T
            return dx.reshape(lead + (self.input_width,))

        return y.reshape(out_shape), backprop


# ---- parameterless modules -----------------------------------------------------------------


class _Elementwise(Module):
    """A parameterless elementwise function. It computes in the input's dtype (float32 and
    float64 are kept, other real dtypes become float64), so it never changes the precision of
    the layers around it; ``dtype`` is therefore None."""

    def __init__(self):
        super().__init__()
        self.dtype = self.compute_dtype = None

    def __repr__(self):
        return f"{type(self).__name__}()"

    def get_config(self) -> dict:
        return {}

    def _value(self, z, xp):
        raise NotImplementedError

    def _derivative(self, z, y, xp):
        """d y / d z, elementwise."""
        raise NotImplementedError

    def __call__(self, x):
        """x (...) -> y of the same shape."""
        xp = self.ops.xp
        return self._value(as_float_array(x, xp), xp)

    def forward_train(self, x, *, input_grad=True):
        """(y, backprop). The derivative is formed here, from the forward's values: the caller
        may then reuse x's buffer or write into y before backprop. Without input_grad, backprop
        checks dy and returns None."""
        input_grad = check_bool(input_grad, "input_grad")
        xp = self.ops.xp
        z = as_float_array(x, xp)
        y = self._value(z, xp)
        derivative = self._derivative(z, y, xp) if input_grad else None

        @run_once
        def backprop(dy):
            """dy (shape of y) -> dx (shape of x)."""
            dy = _check_grad_shape(dy, y, xp)
            return dy * derivative if input_grad else None

        return y, backprop


class Identity(_Elementwise):
    """y = x."""

    def _value(self, z, xp):
        return z

    def _derivative(self, z, y, xp):
        return xp.ones((), dtype=z.dtype)


class ReLU(_Elementwise):
    """y = max(x, 0); the derivative at 0 is taken as 0."""

    def _value(self, z, xp):
        return xp.maximum(z, 0)

    def _derivative(self, z, y, xp):
        return z > 0


def _special(xp, name):
    """scipy.special.<name> for NumPy arrays, cupyx.scipy.special.<name> for CuPy ones."""
    if xp is np:
        import scipy.special as special
    else:
        import cupyx.scipy.special as special
    return getattr(special, name)


class GELU(_Elementwise):
    """Exact GELU: y = x * Phi(x) = x/2 * (1 + erf(x / sqrt(2)))."""

    def _value(self, z, xp):
        return 0.5 * z * (1 + _special(xp, "erf")(z * (1 / math.sqrt(2))))

    def _derivative(self, z, y, xp):
        cdf = 0.5 * (1 + _special(xp, "erf")(z * (1 / math.sqrt(2))))
        pdf = xp.exp(-0.5 * z * z) * (1 / math.sqrt(2 * math.pi))
        return cdf + z * pdf


class Tanh(_Elementwise):
    """y = tanh(x)."""

    def _value(self, z, xp):
        return xp.tanh(z)

    def _derivative(self, z, y, xp):
        return 1 - y * y


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)), by scipy's expit: no overflow, full relative precision."""

    def _value(self, z, xp):
        return _special(xp, "expit")(z)

    def _derivative(self, z, y, xp):
        return y * (1 - y)


class Dropout(Module):
    """Inverted dropout: in forward_train each element is zeroed with probability p and the
    survivors are scaled by 1/(1-p); inference is the identity. The mask is drawn on the host
    from a NumPy Generator: the one passed as ``rng``, else the module's own (from ``seed``).
    Like the activations it computes in the input's dtype (``dtype`` is None)."""

    p = _checked("p", check_probability, "Probability of zeroing an element, [0, 1).")

    def __init__(self, p=0.5, *, seed=None):
        super().__init__()
        self.dtype = self.compute_dtype = None
        self.p = p
        self.seed = seed
        self._rng = np.random.default_rng(seed)

    def __repr__(self):
        return f"Dropout(p={self.p})"

    def get_config(self) -> dict:
        return {"p": self.p}

    def __call__(self, x):
        """Inference: x (...) returned unchanged (as an array)."""
        return as_float_array(x, self.ops.xp)

    def forward_train(self, x, *, rng=None, input_grad=True):
        """x (...) -> (y of the same shape, backprop); without input_grad backprop returns
        None."""
        input_grad = check_bool(input_grad, "input_grad")
        xp = self.ops.xp
        x = as_float_array(x, xp)
        if rng is None:
            rng = self._rng
        elif not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator or None, got {type(rng).__name__}"
            )
        if self.p == 0.0:
            mask = None
            y = x
        else:
            keep = rng.random(x.shape, dtype=x.dtype) >= self.p
            mask = self.ops.asarray(keep * x.dtype.type(1 / (1 - self.p)))
            y = x * mask

        @run_once
        def backprop(dy):
            dy = _check_grad_shape(dy, y, xp)
            if not input_grad:
                return None
            return dy if mask is None else dy * mask

        return y, backprop


# ---- containers ----------------------------------------------------------------------------


def _keyword_options(module):
    """(names of the keyword options module.forward_train takes, whether it takes **kwargs)."""
    params = list(inspect.signature(module.forward_train).parameters.values())[1:]  # skip x
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


class Sequential(Module):
    """Modules applied one after the other. Child i is named str(i), so its parameters appear
    as "i.<key>" (e.g. "0.weight", "1.linear_in.weight") in state_dict(), grads and optimizers.

    ``forward_train(x, **options)`` gives each option (e.g. ``rng``, ``hardening``) only to the
    children whose forward_train accepts it, and returns one backprop that runs the children's
    backprops in reverse order.
    """

    def __init__(self, *modules):
        super().__init__()
        if not modules:
            raise ValueError("Sequential needs at least one module")
        for i, m in enumerate(modules):
            if not isinstance(m, Module):
                raise TypeError(
                    f"Sequential argument {i} must be a fastff Module, got {type(m).__name__}"
                )
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError(
                "the same module instance appears twice in Sequential; its "
                "parameters would be updated twice per step: pass distinct modules"
            )
        dtypes = {m.dtype for m in modules if m.dtype is not None}
        if len(dtypes) > 1:
            raise ValueError(
                f"Sequential mixes parameter dtypes {sorted(d.name for d in dtypes)}"
                "; build every module with the same dtype"
            )
        devices = {m.device for m in modules}
        if len(devices) > 1:
            raise ValueError(
                f"Sequential mixes devices {sorted(devices)}; move the modules to "
                "one device first (or move the Sequential afterwards with .to())"
            )
        self.dtype = dtypes.pop() if dtypes else None
        self.compute_dtype = None if self.dtype is None else compute_dtype(self.dtype)
        self.device = devices.pop()
        self.layers = list(modules)
        self._options = [(m, _keyword_options(m)) for m in self.layers]  # see _child_options

    def children(self):
        return ((str(i), m) for i, m in enumerate(self.layers))

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = ",\n".join(f"  ({i}): {m!r}" for i, m in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"

    def get_config(self) -> dict:
        return {
            "modules": [{"kind": type(m).__name__, "config": m.get_config()} for m in self.layers]
        }

    def astype(self, dtype) -> Sequential:
        """A Sequential of every module's astype(dtype) (parameterless modules are copied)."""
        return Sequential(*(m.astype(dtype) for m in self.layers))

    @classmethod
    def from_config(cls, config: dict) -> Sequential:
        from .module import build_module

        if not isinstance(config, dict) or not isinstance(config.get("modules"), list):
            raise TypeError("a Sequential config is {'modules': [{'kind': ..., 'config': ...}]}")
        return cls(*[build_module(m["kind"], m["config"]) for m in config["modules"]])

    def __call__(self, x):
        """Inference through every module in order."""
        for m in self.layers:
            x = m(x)
        return x

    def _child_options(self):
        """(names of the keyword options, takes **kwargs) of each child's forward_train,
        inspected at construction and again whenever ``layers`` has changed since."""
        if len(self._options) != len(self.layers) or any(
            known is not m for (known, _), m in zip(self._options, self.layers)
        ):
            self._options = [(m, _keyword_options(m)) for m in self.layers]
        return [entry for _, entry in self._options]

    def forward_train(self, x, *, input_grad=True, **options):
        """Returns (y, backprop); backprop(dy) -> dx runs the children's backprops in reverse.

        Without input_grad (x is the model's input: a training loop discards dx) the first
        child is told so where its forward_train takes ``input_grad`` (fastff's layers, sharded
        ones included, and the fastff.nn modules do) and skips its dx; a parameterless first
        child (input dropout, an activation) passes the news on to the next. backprop then
        returns None. Each option goes to the children whose forward_train takes it."""
        input_grad = check_bool(input_grad, "input_grad")
        child_options = self._child_options()
        takes_any = any(var_kw for _, var_kw in child_options)
        accepted = set().union(*(names for names, _ in child_options)) - {"input_grad"}
        unknown = sorted(set(options) - accepted)
        if unknown and not takes_any:
            raise TypeError(
                f"no module of this Sequential accepts the option(s) {unknown}; "
                f"accepted: {sorted(accepted)}"
            )
        backprops = []
        skip_dx = not input_grad  # whether the current child's input needs no gradient
        first_needed = 0  # the children before it were told so and have nothing to learn
        with caller_input(x):  # the children's intermediates are theirs to keep
            for i, (m, (names, var_kw)) in enumerate(zip(self.layers, child_options)):
                kw = {k: v for k, v in options.items() if var_kw or k in names}
                told = skip_dx and "input_grad" in names
                if told:
                    kw["input_grad"] = False
                x, child_backprop = m.forward_train(x, **kw)
                backprops.append(child_backprop)
                if told and not _has_parameters(m):
                    first_needed = i + 1  # its output needs no gradient either
                else:
                    skip_dx = False

        @run_once
        def backprop(dy):
            for i in reversed(range(len(backprops))):
                if dy is None and i < first_needed:
                    break  # the rest were told: no parameters, no dx wanted
                dy = backprops[i](dy)
            return dy if input_grad else None

        return x, backprop


def _has_parameters(module) -> bool:
    return any(m._params for m in module.modules())


# ---- losses --------------------------------------------------------------------------------


def _float_array(a, name):
    refuse_masked(a, name)
    xp = get_array_module(a)
    a = xp.asarray(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    return as_compute_float(a, xp, name), xp


def softmax_cross_entropy(logits, labels):
    """Mean over rows of -log softmax(logits)[label].

    logits (B, C) float, labels (B,) integers in [0, C) -> (loss as a Python float,
    dlogits (B, C) in the logits' dtype: the gradient of the mean loss). Uses the shifted
    log-sum-exp, so large logits do not overflow.
    """
    logits, xp = _float_array(logits, "logits")
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"logits must have shape (rows, classes) with both >= 1, got {tuple(logits.shape)}"
        )
    if xp is np and hasattr(labels, "__cuda_array_interface__"):
        raise TypeError("labels is a CUDA array but logits is a host array; use one device")
    refuse_masked(labels, "labels")
    labels = xp.asarray(labels)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    n_rows, n_classes = logits.shape
    if labels.shape != (n_rows,):
        raise ValueError(
            f"labels must have shape ({n_rows},) to match logits "
            f"{tuple(logits.shape)}, got {tuple(labels.shape)}"
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= n_classes:
        bad = low if low < 0 else high
        raise ValueError(f"labels must lie in [0, {n_classes}), found {bad}")
    rows = xp.arange(n_rows)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = xp.log(xp.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    loss = -float(log_probs[rows, labels].mean(dtype=np.float64))
    dlogits = xp.exp(log_probs)
    dlogits[rows, labels] -= 1
    dlogits /= n_rows
    return loss, dlogits


def mse(pred, target):
    """Mean over all elements of (pred - target)**2.

    pred and target of one shape (at least one element) -> (loss as a Python float, dpred in
    pred's dtype).
    """
    pred, xp = _float_array(pred, "pred")
    if (xp is np) != (get_array_module(target) is np):
        raise TypeError("pred and target must be on the same device")
    refuse_masked(target, "target")
    target = xp.asarray(target)
    if target.dtype.kind not in "fiu":
        raise TypeError(f"target must hold real numbers, got dtype {target.dtype}")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if pred.size == 0:
        raise ValueError("mse of empty arrays is undefined")
    diff = pred - target.astype(pred.dtype, copy=False)
    loss = float((diff * diff).mean(dtype=np.float64))
    return loss, diff * pred.dtype.type(2.0 / pred.size)
