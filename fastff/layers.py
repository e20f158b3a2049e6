"""The FFF layers: parameters, validation and dispatch to a backend's kernels."""
from __future__ import annotations

import numpy as np

from ._validation import as_rows, check_choice, check_fits_in_memory, check_int
from .module import Module
from .ops import ACTIVATIONS


def _uniform(rng, shape, bound, dtype):
    """U(-bound, bound) drawn straight in `dtype`: no float64 temporary for huge trees."""
    out = rng.random(shape, dtype=dtype)
    out *= dtype.type(2 * bound)
    out -= dtype.type(bound)
    return out


class UltraFFF(Module):
    """Neuron-tree fast feedforward layer of UltraFastBERT.

    `parallel_size` trees of depth `depth` (2**(depth+1) - 1 neurons each) share the input; a row
    evaluates the depth+1 neurons on its root-to-leaf path in every tree (right child iff the
    pre-activation is > 0) and the trees' outputs are summed.

    Parameters (state_dict, as UltraFastBERT stores them): ``linear_in.weight``
    (T*n_nodes, input_width), ``linear_in.bias`` (T*n_nodes,), ``linear_out.weight``
    (output_width, T*n_nodes).

    ``layer(x)``: x of shape (..., input_width) -> (..., output_width), hard inference.
    ``layer.forward_train(x) -> (y, backprop)``; ``backprop(dy) -> dx`` adds into ``layer.grads``.
    Inputs of another float or integer dtype are cast to the layer's dtype.
    """

    def __init__(self, input_width, output_width, depth, parallel_size=1, activation="gelu", *,
                 dtype=np.float32, seed=None):
        super().__init__(dtype)
        self.input_width = check_int(input_width, "input_width", 1)
        self.output_width = check_int(output_width, "output_width", 1)
        self.depth = check_int(depth, "depth", 0)
        self.parallel_size = check_int(parallel_size, "parallel_size", 1)
        self.activation = check_choice(activation, "activation", ACTIVATIONS)
        self.n_nodes = 2 ** (self.depth + 1) - 1
        total_nodes = self.parallel_size * self.n_nodes
        check_fits_in_memory(
            total_nodes * (self.input_width + 1 + self.output_width) * self.dtype.itemsize,
            f"UltraFFF(depth={self.depth}, parallel_size={self.parallel_size}, "
            f"{self.input_width}->{self.output_width}, {self.dtype}) parameters",
        )
        rng = np.random.default_rng(seed)
        k_in = (1.0 / self.input_width) ** 0.5
        k_out = (1.0 / ((self.depth + 1) * self.parallel_size)) ** 0.5
        self._params = {
            "w_in": _uniform(rng, (total_nodes, self.input_width), k_in, self.dtype),
            "b_in": _uniform(rng, (total_nodes,), k_in, self.dtype),
            # Stored transposed: node g's output weights are the contiguous row w_out_t[g].
            "w_out_t": _uniform(rng, (self.output_width, total_nodes), k_out, self.dtype).T.copy(),
        }
        self._anchor = {
            "linear_in.weight": ("w_in", None),
            "linear_in.bias": ("b_in", None),
            "linear_out.weight": ("w_out_t", (1, 0)),
        }

    def __repr__(self):
        return (f"UltraFFF({self.input_width}, {self.output_width}, depth={self.depth}, "
                f"parallel_size={self.parallel_size}, activation={self.activation!r}, "
                f"dtype={self.dtype.name}, device={self.device!r})")

    def get_config(self) -> dict:
        return {"input_width": self.input_width, "output_width": self.output_width,
                "depth": self.depth, "parallel_size": self.parallel_size,
                "activation": self.activation, "dtype": self.dtype.name}

    @property
    def training_width(self) -> int:
        """Neurons a dense layer of the same parameter count would evaluate per row."""
        return self.parallel_size * self.n_nodes

    @property
    def neurons_per_inference(self) -> int:
        return self.parallel_size * (self.depth + 1)

    def _forward(self, x, save_path):
        ops = self.ops
        rows, lead = as_rows(x, self.input_width, self.dtype, ops.xp)
        p = self._params
        y, visited, preact = ops.ultra_forward(rows, p["w_in"], p["b_in"], p["w_out_t"],
                                               self.depth, self.parallel_size, self.activation,
                                               save_path)
        return rows, lead, y, visited, preact

    def __call__(self, x):
        """Hard inference: x (..., input_width) -> y (..., output_width)."""
        _, lead, y, _, _ = self._forward(x, save_path=False)
        return y.reshape(lead + (self.output_width,))

    def forward_train(self, x):
        """Training forward: returns (y, backprop). Keeps each row's visited nodes and
        pre-activations, B * T * (depth+1) numbers, for the O(depth) backward."""
        rows, lead, y, visited, preact = self._forward(x, save_path=True)
        version, device, out_shape = self._version, self.device, lead + (self.output_width,)

        def backprop(dy):
            """dy (..., output_width), the shape of y -> dx (..., input_width); adds the
            parameter gradients into layer.grads."""
            self._check_fresh(version, device)
            dy_rows, dy_lead = as_rows(dy, self.output_width, self.dtype, self.ops.xp, name="dy")
            if dy_lead != lead:
                raise ValueError(f"dy must have the shape of y, {out_shape}, got "
                                 f"{dy_lead + (self.output_width,)}")
            g = self._allocate_grads()
            p = self._params
            dx = self.ops.ultra_backward(rows, dy_rows, p["w_in"], p["w_out_t"], visited, preact,
                                         self.activation, g["w_in"], g["b_in"], g["w_out_t"])
            return dx.reshape(lead + (self.input_width,))

        return y.reshape(out_shape), backprop
