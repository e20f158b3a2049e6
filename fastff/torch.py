"""PyTorch modules that run fastff's kernels under autograd: ``UltraFFF`` and ``FFF``.

``import fastff.torch`` needs PyTorch (the ``torch`` extra); ``import fastff`` never imports it.

- ``UltraFFF(input_width, output_width, depth, parallel_size=1, activation=torch.nn.GELU)``:
  UltraFastBERT's intermediate FFF. Its state dict is UltraFastBERT's, ``linear_in.weight``
  (T*n, in), ``linear_in.bias`` (T*n,), ``linear_out.weight`` (out, T*n) with
  n = 2**(depth+1) - 1, and it computes what UltraFastBERT's masked dense module computes
  (DESIGN.md section 1): the hard path forward and the hard-path backward (the decisions are
  not differentiated), at O(depth) per row instead of O(2**depth).
- ``FFF(input_width, leaf_width, output_width, depth, activation=torch.nn.ReLU(), dropout=0.0,
  train_hardened=False, region_leak=0.0, usage_mode="none")``: the ``fastfeedforward``
  package's ``FFF``, with its state dict (``depth``, ``node_weights``, ``node_biases``,
  ``w1s``, ``b1s``, ``w2s``, ``b2s``, and ``node_usage`` / ``leaf_usage`` when it tracks
  usage), its ``training_forward(x, return_entropies=False, use_hard_decisions=False)``,
  ``forward`` and ``eval_forward``. Deviations from the package, all documented on the class:
  ``eval_forward`` keeps the reached leaf's ``b2s`` (as fastff.FFF's inference and the
  package's own training forward do; the package's eval leaves it out); hardened training
  draws its region-leak and dropout masks for the visited path only; the usage counters count
  the rows that reach a node or leaf, as fastff.FFF's do.

Activations: the names "relu", "gelu", "identity", or torch's ``ReLU``, exact ``GELU`` and
``Identity`` (class or instance), the only ones with kernels.

How: each training forward is a ``torch.autograd.Function`` whose forward and backward call the
same ``Ops`` methods as the NumPy layers (``fastff.cpu.ops.CPUOps`` on the CPU,
``fastff.gpu.ops.GPUOps`` on CUDA). CPU tensors reach the kernels as NumPy views
(``Tensor.numpy`` shares memory): a C-contiguous input of the parameters' dtype, the
parameters, the outputs and the gradients are never copied. CUDA tensors go to CuPy through
DLPack, and the kernels run on torch's current stream, with no host round trip (not tested
here: the project's CI has no GPU). Inputs get the NumPy layers' checks and errors
(``fastff._validation.as_rows``): a wrong width, a bool or complex dtype, or a tensor on the
other device raise the same ValueError or TypeError; other float and integer dtypes are cast
to the parameters' dtype (float16 and bfloat16 in torch, so that their gradient flows back),
and a non-contiguous input is copied once. Without gradients (``torch.no_grad``,
``inference_mode`` or frozen parameters) inference skips autograd and calls the inference
kernel directly; under ``no_grad`` / ``inference_mode`` the parameters' kernel views are also
kept between calls (rebuilt when a parameter's storage or layout changes), which takes a batch-1
UltraFFF call from about 80 to 50 us on the project's VM.

Layout: the kernels read a node's output weights (UltraFFF) and a leaf's hidden units (FFF) as
contiguous rows, so ``UltraFFF.linear_out.weight`` and ``FFF.w1s`` are transposed views of
contiguous storage (shapes and values are the anchors'; ``weight.t()`` and
``w1s.transpose(1, 2)`` are contiguous). Saving, loading, ``.to()``, ``deepcopy`` and the
optimizers keep that layout; code that needs contiguous tensors (``safetensors``:
``save_model(..., force_contiguous=True)``; ``parameters_to_vector``) should call
``.contiguous()``. A parameter replaced by a contiguous tensor still works, at the cost of a
transposing copy per call.

Threads: the kernels take fastff's thread count (``fastff.num_threads`` scope, else
``fastff.set_num_threads`` / threadpoolctl, else ``OMP_NUM_THREADS``, else the CPUs available),
capped at ``torch.get_num_threads()``, so that neither budget is exceeded: a model set to
``torch.set_num_threads(1)`` runs fastff on one thread too. fastff's kernels and torch's CPU
ops share one OpenMP runtime in the process (torch's libgomp and the system's have the same
soname, and whichever loads first serves both; checked on Linux with torch's wheels), so the
two run one after the other on one team of threads rather than on two pools. Soft FFF
training's GEMMs are NumPy's (its BLAS threads, which threadpoolctl sets).

torch.compile: the kernel calls are wrapped in ``torch.compiler.disable``: a compiled model
runs the rest of its graph compiled and breaks the graph at each FFF layer, which runs eagerly
(forward and backward).
"""

from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from fastff._threads import effective_n_threads
from fastff._validation import (
    as_rows,
    check_bool,
    check_choice,
    check_depth,
    check_fits_in_memory,
    check_int,
    check_probability,
    check_width,
)
from fastff.backends import get_ops
from fastff.layers import USAGE_MODES, usage_increments
from fastff.ops import ACTIVATIONS
from fastff.reference import ENTROPY_EPS

__all__ = ["UltraFFF", "FFF"]

_ACTIVATIONS: dict[type, str] = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Identity: "identity"}
_ACTIVATION_CLASSES = {name: cls for cls, name in _ACTIVATIONS.items()}
_NUMPY_DTYPES: dict[Any, np.dtype] = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}
_WIDENED = (torch.float16, torch.bfloat16)  # NumPy cannot view them: cast in torch


# ---- shared plumbing -------------------------------------------------------------------------


def _activation_module(activation) -> nn.Module:
    """The activation argument (a fastff name, or torch's ReLU / exact GELU / Identity, class or
    instance) as a module instance, as both PyTorch projects keep it."""
    if isinstance(activation, str):
        return _ACTIVATION_CLASSES[check_choice(activation, "activation", ACTIVATIONS)]()
    if isinstance(activation, type) and issubclass(activation, nn.Module):
        activation = activation()
    _activation_name(activation)
    return activation


def _activation_name(module) -> str:
    """The kernels' name of an activation module; ValueError for one they do not have."""
    name = _ACTIVATIONS.get(type(module))
    if name is None or getattr(module, "approximate", "none") != "none":
        raise ValueError(
            f"activation {module!r} has no fastff kernel: use torch.nn.ReLU, torch.nn.GELU "
            f"(exact, approximate='none'), torch.nn.Identity or one of {sorted(ACTIVATIONS)}"
        )
    return name


def _n_threads() -> int:
    """fastff's thread count for this call, at most torch's (see the module docstring)."""
    return max(1, min(effective_n_threads(), torch.get_num_threads()))


class _Place:
    """A device's Ops and the zero-copy bridges between its tensors and the Ops' arrays."""

    def __init__(self, device: torch.device):
        if device.type not in ("cpu", "cuda"):
            raise TypeError(
                f"fastff.torch runs on CPU and CUDA tensors; the parameters are on {device}"
            )
        self.device = device
        self.cuda = device.type == "cuda"
        self.ops = get_ops(device.type)
        self.xp = self.ops.xp

    def array(self, t: torch.Tensor):
        """A NumPy (CPU) or CuPy (CUDA) view of t."""
        t = t.detach()
        return self.xp.from_dlpack(t) if self.cuda else t.numpy()

    def tensor(self, a) -> torch.Tensor:
        """A tensor viewing the Ops' array a."""
        return torch.from_dlpack(a) if self.cuda else torch.from_numpy(a)

    def scope(self):
        """On CUDA: CuPy on this device and on torch's current stream."""
        if not self.cuda:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(self.xp.cuda.Device(self.device.index))
        stream = torch.cuda.current_stream(self.device)
        stack.enter_context(self.xp.cuda.ExternalStream(stream.cuda_stream))
        return stack


@functools.cache
def _place(device: torch.device) -> _Place:
    return _Place(device)


def _check_params(what: str, tensors) -> tuple[_Place, np.dtype]:
    """The place and NumPy dtype of a module's parameters, which must agree."""
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors:
        if t.dtype != dtype or t.device != device:
            raise ValueError(
                f"{what}'s parameters must share one dtype and device, got {dtype} on {device} "
                f"and {t.dtype} on {t.device}"
            )
    if dtype not in _NUMPY_DTYPES:
        raise ValueError(
            f"{what}'s parameters must be float32 or float64 (module.float() or "
            f"module.double()), got {dtype}"
        )
    return _place(device), _NUMPY_DTYPES[dtype]


def _input(x, dtype: torch.dtype) -> torch.Tensor:
    """x as a tensor; float16 and bfloat16 cast to the parameters' dtype here, in torch."""
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.to(dtype) if x.dtype in _WIDENED else x


def _rows(place: _Place, x: torch.Tensor, width: int, dtype: np.dtype):
    """x (..., width) as the kernels' C-contiguous rows and the leading shape, with the NumPy
    layers' checks and errors; a view of x when it is contiguous and of `dtype`."""
    src: Any = x.detach()
    if x.device == place.device:
        src = place.array(src)
    elif x.device.type == place.device.type:  # two GPUs
        raise TypeError(f"x is on {x.device} but the module on {place.device}: move one of them")
    return as_rows(src, width, dtype, place.xp)  # refuses a tensor on the other device


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous: a view where the parameter keeps the kernels' layout, else a copy
    (through autograd, so its gradient still reaches the parameter)."""
    return t if t.is_contiguous() else t.contiguous()


def _needs_grad(x: torch.Tensor, params) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _dx(place: _Place, dx, x: torch.Tensor) -> torch.Tensor:
    return place.tensor(dx).reshape(x.shape).to(x.dtype)


def _dy_rows(place: _Place, dy: torch.Tensor, dtype: torch.dtype):
    return place.array(dy.reshape(-1, dy.shape[-1]).to(dtype).contiguous())


def _zeros(params) -> list[torch.Tensor]:
    return [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in params]


# ---- inference without autograd --------------------------------------------------------------
# A module's parameters as the Ops' arrays, kept between inference calls. Building them is more
# torch calls than a small batch's kernel call: UltraFFF(768, 768, 11) on one row took 57 us
# through the general path, 9 us of them in the kernel, on the project's VM. An entry holds
# views of the very tensors its key describes (address, shape, strides, dtype, device and
# negative bit of each stored parameter), so while it lives those storages do, and an address
# seen again is the same storage; in-place updates (load_state_dict, an optimizer step) show
# through the views. A call with autograd (training) and Module._apply (.to(), .double(), ...)
# drop the entry, so that replaced parameters are not kept alive by it.
_INFERENCE_ARRAYS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inference_arrays(module: nn.Module, stored, kernel_views, what: str):
    """(place, torch dtype, kernel arrays) of the module's parameters for an inference call, or
    None when the call must take the general path: the kernels' layout needs a copy of a
    parameter (made per call, so that updates to it show), `stored` is None (a parameter is
    not held plainly, e.g. under torch.nn.utils.parametrize), or the module is unhashable.

    stored: the module's parameter tensors as stored; kernel_views(stored): views of them in
    the kernels' order and layout, contiguous where the parameters keep the kernels' layout."""
    if stored is None:
        return None
    key = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t.is_neg()) for t in stored)
    try:
        entry = _INFERENCE_ARRAYS.get(module)
    except TypeError:  # a subclass that defines __eq__ without __hash__
        return None
    if entry is not None and entry[0] == key:
        return entry[1]
    _INFERENCE_ARRAYS.pop(module, None)
    params = kernel_views(stored)
    place, _ = _check_params(what, params)
    if not all(p.is_contiguous() for p in params):
        return None
    with place.scope():
        found = (place, params[0].dtype, tuple(map(place.array, params)))
    _INFERENCE_ARRAYS[module] = (key, found)
    return found


def _forget_inference_arrays(module: nn.Module) -> None:
    """Drop the module's cached views (a training call, Module._apply)."""
    try:
        _INFERENCE_ARRAYS.pop(module, None)
    except TypeError:  # unhashable: never cached
        pass


def _stored(parameters: dict, names) -> tuple | None:
    """The named entries of a module's _parameters; None when one is missing (parametrized,
    pruned or deleted: the general path then reads the attribute)."""
    try:
        found = tuple(parameters[name] for name in names)
    except KeyError:
        return None
    return None if any(t is None for t in found) else found


def _plain_rows(place: _Place, x, width: int, dtype: torch.dtype):
    """x (..., width) as the kernels' rows without checks beyond these: a C-contiguous tensor
    of the parameters' dtype on their device (a view); None for anything else, which the
    general path (_rows: casts, copies, errors) takes."""
    if (
        isinstance(x, torch.Tensor)
        and x.dtype == dtype
        and x.device == place.device
        and x.dim() >= 1
        and x.shape[-1] == width
        and x.is_contiguous()
    ):
        return place.array(x).reshape(-1, width)
    return None


def _infer_fast(x, found, width: int, run):
    """run(rows, arrays, ops) -> y rows, on x's rows viewed in place; the output tensor
    (..., out) viewing y, or None when x needs the general path."""
    place, dtype, arrays = found
    with place.scope():  # on CUDA the input's DLPack exchange too, as _rows in the general path
        rows = _plain_rows(place, x, width, dtype)
        if rows is None:
            return None
        y = place.tensor(run(rows, arrays, place.ops))
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[1])


# ---- neuron-tree FFF -------------------------------------------------------------------------


class _UltraCall:
    """What one UltraFFF call passes to its autograd Function besides tensors."""

    def __init__(self, module: UltraFFF, place: _Place, dtype: np.dtype):
        self.place, self.dtype = place, dtype
        self.input_width, self.depth = module.input_width, module.depth
        self.n_trees = module.parallel_size
        self.act = _activation_name(module.activation)

    def params(self, w_in, b_in, w_out_t) -> dict:
        a = self.place.array
        return {"w_in": a(w_in), "b_in": a(b_in), "w_out_t": a(w_out_t)}

    def forward(self, x, params, save_path: bool):
        with self.place.scope():
            rows, lead = _rows(self.place, x, self.input_width, self.dtype)
            y, visited, preact = self.place.ops.ultra_forward(
                rows,
                self.params(*params),
                self.depth,
                self.n_trees,
                self.act,
                save_path,
                _n_threads(),
            )
            y_t = self.place.tensor(y).reshape(lead + (y.shape[1],))
        return y_t, rows, visited, preact


class _UltraFunction(torch.autograd.Function):
    """(x, w_in, b_in, w_out_t) -> y with the hard-path backward of fastff's kernels."""

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_out_t, call: _UltraCall):
        y, rows, visited, preact = call.forward(x, (w_in, b_in, w_out_t), save_path=True)
        ctx.save_for_backward(x, w_in, b_in, w_out_t)  # torch's check of in-place changes
        ctx.call, ctx.rows, ctx.visited, ctx.preact = call, rows, visited, preact
        return y

    @staticmethod
    @once_differentiable  # the kernels' backward is not itself differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        call: _UltraCall = ctx.call
        place = call.place
        grads = _zeros(params)
        with place.scope():
            g = dict(zip(("w_in", "b_in", "w_out_t"), map(place.array, grads)))
            need_dx = ctx.needs_input_grad[0]
            dx = place.ops.ultra_backward(
                ctx.rows,
                _dy_rows(place, dy, params[0].dtype),
                call.params(*params),
                g,
                ctx.visited,
                ctx.preact,
                call.act,
                _n_threads(),
                need_dx,
            )
            dx_t = _dx(place, dx, x) if need_dx else None
        return (dx_t, *grads, None)


def _ultra_views(stored) -> tuple[torch.Tensor, ...]:
    """(w_in, b_in, w_out_t) of (linear_in.weight, linear_in.bias, linear_out.weight):
    linear_out.weight.t() is the kernels' (T*n, out) layout."""
    return (stored[0], stored[1], stored[2].t())


def _ultra_params(module: UltraFFF) -> tuple[torch.Tensor, ...]:
    """_ultra_views of the module's parameters as its attributes give them."""
    return _ultra_views((module.linear_in.weight, module.linear_in.bias, module.linear_out.weight))


def _ultra_infer(module: UltraFFF, x) -> torch.Tensor | None:
    """Inference through the cached arrays (see _inference_arrays), or None."""
    modules = module._modules
    linear_in, linear_out = modules.get("linear_in"), modules.get("linear_out")
    if linear_in is None or linear_out is None:
        return None
    stored_in = _stored(linear_in._parameters, ("weight", "bias"))
    stored_out = _stored(linear_out._parameters, ("weight",))
    stored = None if stored_in is None or stored_out is None else stored_in + stored_out
    found = _inference_arrays(module, stored, _ultra_views, "UltraFFF")
    if found is None:
        return None
    act = _activation_name(module.activation)

    def run(rows, arrays, ops):
        p = dict(zip(("w_in", "b_in", "w_out_t"), arrays))
        args = (module.depth, module.parallel_size, act, False, _n_threads())
        return ops.ultra_forward(rows, p, *args)[0]

    return _infer_fast(x, found, module.input_width, run)


@torch.compiler.disable
def _ultra(module: UltraFFF, x) -> torch.Tensor:
    if not torch.is_grad_enabled():
        y = _ultra_infer(module, x)
        if y is not None:
            return y
    params = _ultra_params(module)
    place, dtype = _check_params("UltraFFF", params)
    x = _input(x, params[0].dtype)
    call = _UltraCall(module, place, dtype)
    tensors = tuple(_kernel_layout(p) for p in params)
    if _needs_grad(x, tensors):
        _forget_inference_arrays(module)
        return _UltraFunction.apply(x, *tensors, call)
    return call.forward(x, tensors, save_path=False)[0]


class UltraFFF(nn.Module):
    """UltraFastBERT's neuron-tree FFF (its ``FFF`` module) on fastff's kernels.

    ``parallel_size`` trees of depth ``depth`` (``n_nodes = 2**(depth+1) - 1`` neurons each);
    a row evaluates the depth + 1 neurons on its path in every tree (right child iff the
    pre-activation is > 0) and the trees' outputs are summed. Parameters as UltraFastBERT's:
    ``linear_in`` (``nn.Linear(input_width, T*n_nodes)``) and ``linear_out``
    (``nn.Linear(T*n_nodes, output_width, bias=False)``), initialised from the same uniform
    distributions (U(+-1/sqrt(input_width)) and U(+-1/sqrt(T*(depth+1)))), not from the same
    random stream. ``linear_out.weight`` is kept as a transposed view (module docstring).

    ``forward(x)``: x (..., input_width) -> (..., output_width). Under autograd its backward is
    the hard-path one UltraFastBERT's masked module gets from autograd (decisions are
    constants); without gradients it runs the inference kernel alone. Unlike UltraFastBERT's
    module (which reshapes the output like its input), input and output widths may differ.
    ``activation``: torch.nn.GELU (the default; exact), ReLU, Identity, or their fastff names.
    ``device`` and ``dtype`` (float32 or float64, default torch's default dtype) as for torch's
    modules.
    """

    def __init__(
        self,
        input_width,
        output_width,
        depth,
        parallel_size=1,
        activation=nn.GELU,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.input_width = check_width(input_width, "input_width")
        self.output_width = check_width(output_width, "output_width")
        self.depth = check_depth(depth, "UltraFFF")
        self.parallel_size = check_int(parallel_size, "parallel_size", 1)
        self.activation = _activation_module(activation)
        self.n_nodes = 2 ** (self.depth + 1) - 1
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        total = self.parallel_size * self.n_nodes
        check_fits_in_memory(
            total * (self.input_width + 1 + self.output_width) * _NUMPY_DTYPES[dtype].itemsize,
            f"UltraFFF(depth={self.depth}, parallel_size={self.parallel_size}, "
            f"{self.input_width}->{self.output_width}, {dtype}) parameters",
        )
        # The Linear modules for their names and attributes; their own init is skipped (meta).
        self.linear_in = nn.Linear(self.input_width, total, bias=True, device="meta")
        self.linear_out = nn.Linear(total, self.output_width, bias=False, device="meta")
        like: dict[str, Any] = {"device": device, "dtype": dtype}
        k_in = math.sqrt(1.0 / self.input_width)
        k_out = math.sqrt(1.0 / ((self.depth + 1) * self.parallel_size))
        self.linear_in.weight = nn.Parameter(
            torch.empty((total, self.input_width), **like).uniform_(-k_in, k_in)
        )
        self.linear_in.bias = nn.Parameter(torch.empty((total,), **like).uniform_(-k_in, k_in))
        w_out_t = torch.empty((total, self.output_width), **like).uniform_(-k_out, k_out)
        self.linear_out.weight = nn.Parameter(w_out_t.t())  # (out, T*n): a transposed view

    def extra_repr(self) -> str:
        return (
            f"{self.input_width}, {self.output_width}, depth={self.depth}, "
            f"parallel_size={self.parallel_size}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., input_width) -> (..., output_width), the hard path of every tree."""
        return _ultra(self, x)

    def _apply(self, *args, **kwargs):
        _forget_inference_arrays(self)  # its views would keep the old storage alive
        return super()._apply(*args, **kwargs)


# ---- router-leaf FFF -------------------------------------------------------------------------

_FFF_KEYS = ("node_w", "node_b", "w1t", "b1", "w2", "b2")
# the stored parameters behind them, in that order
_FFF_STORED = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")


class _FFFCall:
    """What one FFF call passes to its autograd Function besides tensors."""

    def __init__(self, module: FFF, place: _Place, dtype: np.dtype, mode: str, masks=None):
        self.place, self.dtype, self.mode, self.masks = place, dtype, mode, masks
        self.input_width, self.depth = module.input_width, module._tree_depth
        self.act = _activation_name(module.activation)
        self.saved: dict | None = None  # the training forward's, for usage counting

    def params(self, params) -> dict:
        return dict(zip(_FFF_KEYS, map(self.place.array, params)))

    def forward(self, x, params):
        """mode "infer": hard inference; "soft" / "hard": the training forwards."""
        place, ops = self.place, self.place.ops
        with place.scope():
            rows, lead = _rows(place, x, self.input_width, self.dtype)
            p, n_threads = self.params(params), _n_threads()
            if self.mode == "infer":
                y = ops.fff_infer(rows, p, self.depth, self.act, n_threads)
            else:
                swap, drop = self.masks(rows.shape[0]) if self.masks else (None, None)
                swap = None if swap is None else place.array(swap)
                drop = None if drop is None else place.array(drop)
                if self.mode == "hard":
                    y, self.saved = ops.fff_hard_forward(
                        rows, p, self.depth, self.act, n_threads, swap, drop
                    )
                else:
                    y, self.saved = ops.fff_soft_forward(rows, p, self.act, n_threads, swap, drop)
            y_t = place.tensor(y).reshape(lead + (y.shape[1],))
        return y_t, rows


class _FFFFunction(torch.autograd.Function):
    """(x, node_w, node_b, w1t, b1, w2, b2) -> y, soft or hardened training on fastff's
    kernels; the decision entropies are computed outside (FFF._entropies)."""

    @staticmethod
    def forward(ctx, x, node_w, node_b, w1t, b1, w2, b2, call: _FFFCall):
        params = (node_w, node_b, w1t, b1, w2, b2)
        y, rows = call.forward(x, params)
        ctx.save_for_backward(x, *params)
        ctx.call, ctx.rows, ctx.kernel_saved = call, rows, call.saved
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, *params = ctx.saved_tensors
        call: _FFFCall = ctx.call
        place = call.place
        grads = _zeros(params)
        with place.scope():
            ops = place.ops
            backward = ops.fff_hard_backward if call.mode == "hard" else ops.fff_soft_backward
            dx = backward(
                ctx.rows,
                _dy_rows(place, dy, params[0].dtype),
                call.params(params),
                ctx.kernel_saved,
                call.act,
                0.0,
                call.params(grads),
                _n_threads(),
                need_dx=ctx.needs_input_grad[0],
            )
            dx_t = _dx(place, dx, x) if ctx.needs_input_grad[0] else None
        return (dx_t, *grads, None)


def _fff_views(stored) -> tuple[torch.Tensor, ...]:
    """(node_w, node_b, w1t, b1, w2, b2), the kernels' order and layout, as views of the stored
    parameters (in _FFF_STORED's order)."""
    node_w, node_b, w1s, b1, w2, b2 = stored
    return (node_w, node_b, w1s.transpose(1, 2), b1, w2, b2)


def _fff_infer(module: FFF, x) -> torch.Tensor | None:
    """Hard inference through the cached arrays (see _inference_arrays), or None."""
    stored = _stored(module._parameters, _FFF_STORED)
    found = _inference_arrays(module, stored, _fff_views, "FFF")
    if found is None:
        return None
    act = _activation_name(module.activation)

    def run(rows, arrays, ops):
        p = dict(zip(_FFF_KEYS, arrays))
        return ops.fff_infer(rows, p, module._tree_depth, act, _n_threads())

    return _infer_fast(x, found, module.input_width, run)


@torch.compiler.disable
def _fff_eval(module: FFF, x) -> torch.Tensor:
    if not torch.is_grad_enabled():
        y = _fff_infer(module, x)
        if y is not None:
            return y
    return _fff(module, x, "infer")[0]


@torch.compiler.disable
def _fff(module: FFF, x, mode: str, masks=None) -> tuple[torch.Tensor, _FFFCall]:
    params = module._kernel_params()
    place, dtype = _check_params("FFF", params)
    x = _input(x, params[0].dtype)
    call = _FFFCall(module, place, dtype, mode, masks)
    if mode == "infer" and _needs_grad(x, params):
        call.mode = "hard"  # the hard path under autograd: hardened training's kernels
    if call.mode == "infer":
        return call.forward(x, params)[0], call
    _forget_inference_arrays(module)
    return _FFFFunction.apply(x, *params, call), call


class FFF(nn.Module):
    """The ``fastfeedforward`` package's ``FFF`` (router-leaf, "Fast Feedforward Networks") on
    fastff's kernels.

    Constructor, attributes and state dict as the package's: ``depth`` (a 0-d long parameter
    without gradient), ``node_weights`` (n_nodes, in), ``node_biases`` (n_nodes, 1), ``w1s``
    (n_leaves, in, leaf), ``b1s`` (n_leaves, leaf), ``w2s`` (n_leaves, leaf, out), ``b2s``
    (n_leaves, out), and with usage tracking ``node_usage`` / ``leaf_usage``; the parameters
    are drawn like the package's, in its order, so the same ``torch.manual_seed`` gives the
    same weights. ``w1s`` is a transposed view (module docstring). The arguments are checked
    as fastff.FFF checks them (``dropout`` and ``region_leak`` in [0, 1)); ``activation`` is
    torch.nn.ReLU (default), exact GELU, Identity, or their fastff names.

    ``training_forward(x, return_entropies=False, use_hard_decisions=False)``: soft mixture of
    every leaf, or with ``use_hard_decisions`` / ``train_hardened`` the rounded path only (right
    iff the logit is > 0; O(depth) routers and one leaf per row). In training mode region leak
    and dropout apply. With ``return_entropies`` also returns the mean batch entropy of every
    node's decision, (n_nodes,), as the package does: computed in torch from every router's
    logit (O(n_nodes * in) per row, also when hardened), differentiable. Soft training draws
    its region-leak and dropout masks with torch's generator in the package's order and
    shapes, so a seeded run gives the package's output; hardened training draws a (B, depth)
    region-leak and a (B, leaf) dropout mask for the visited path only (the same distribution
    as the package's masks over every node and leaf, not its random stream).

    ``forward``: ``training_forward`` in training mode, ``eval_forward`` in eval mode, with the
    package's checks. ``eval_forward(x)``: hard inference, right iff the logit is >= 0, the
    reached leaf's output **including** ``b2s``: fastff.FFF's inference and the package's
    training forward with hard decisions; the package's ``eval_forward`` leaves ``b2s`` out (the
    two agree when ``b2s`` is zero). Under autograd ``eval_forward`` runs the hardened training
    kernels: their path differs only where a logit is exactly 0, their outputs by float
    rounding (the training kernels sum in another order; about 1 ulp).

    ``master_leaf`` is accepted only as False (NotImplementedError otherwise): the package has
    no master leaf, and neither the load-balancing term; both are fastff.FFF's.

    Usage counters (``usage_mode`` "soft" or "hard"), added to by ``training_forward``, count
    as fastff.FFF's do: "soft" sums each row's probability of reaching a node or leaf
    (``leaf_usage`` is then the package's), "hard" and hardened training count the rows whose
    rounded path reaches it. The package differs below the root, where it adds the parent's
    decision weight summed over every row, and in "hard" mode during soft training, where it
    rounds each leaf's mixture weight (a row whose weights are all below 1/2 counts nowhere).
    """

    def __init__(
        self,
        input_width,
        leaf_width,
        output_width,
        depth,
        activation="relu",
        dropout=0.0,
        train_hardened=False,
        region_leak=0.0,
        usage_mode="none",
        *,
        master_leaf=False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if check_bool(master_leaf, "master_leaf"):
            raise NotImplementedError(
                "fastff.torch.FFF has no master leaf (master_leaf=True): it mirrors the "
                "fastfeedforward package's FFF, which has none; fastff.FFF(..., master_leaf=True) "
                "has one"
            )
        self.input_width = check_width(input_width, "input_width")
        self.leaf_width = check_width(leaf_width, "leaf_width")
        self.output_width = check_width(output_width, "output_width")
        self._tree_depth = check_depth(depth, "FFF")
        self.activation = _activation_module(activation)
        self.dropout = check_probability(dropout, "dropout")
        self.train_hardened = check_bool(train_hardened, "train_hardened")
        self.region_leak = check_probability(region_leak, "region_leak")
        self.usage_mode = check_choice(usage_mode, "usage_mode", USAGE_MODES)
        dtype = torch.float32 if dtype is None else dtype
        if dtype not in _NUMPY_DTYPES:
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.n_leaves = 2**self._tree_depth
        self.n_nodes = self.n_leaves - 1
        in_w, leaf_w, out_w = self.input_width, self.leaf_width, self.output_width
        check_fits_in_memory(
            (self.n_nodes * (in_w + 1) + self.n_leaves * (leaf_w * (in_w + 1 + out_w) + out_w))
            * _NUMPY_DTYPES[dtype].itemsize,
            f"FFF(depth={self._tree_depth}, {in_w}->{leaf_w}->{out_w}, {dtype}) parameters",
        )
        # The package's draws, in its order and dtype (float32), then converted.
        self.depth = nn.Parameter(
            torch.tensor(self._tree_depth, dtype=torch.long, device=device), requires_grad=False
        )
        k_in, k_leaf = 1.0 / math.sqrt(in_w), 1.0 / math.sqrt(leaf_w)

        def draw(shape, k):
            return torch.empty(shape, dtype=torch.float32).uniform_(-k, k).to(device, dtype)

        self.node_weights = nn.Parameter(draw((self.n_nodes, in_w), k_in))
        self.node_biases = nn.Parameter(draw((self.n_nodes, 1), k_in))
        w1s = draw((self.n_leaves, in_w, leaf_w), k_in)  # stored as (n_leaves, leaf, in) rows
        self.w1s = nn.Parameter(w1s.transpose(1, 2).contiguous().transpose(1, 2))
        self.b1s = nn.Parameter(draw((self.n_leaves, leaf_w), k_in))
        self.w2s = nn.Parameter(draw((self.n_leaves, leaf_w, out_w), k_leaf))
        self.b2s = nn.Parameter(draw((self.n_leaves, out_w), k_leaf))
        if self.usage_mode != "none":
            zeros = torch.zeros  # float32 counters, as the package's
            self.node_usage = nn.Parameter(zeros(self.n_nodes, device=device), requires_grad=False)
            self.leaf_usage = nn.Parameter(zeros(self.n_leaves, device=device), requires_grad=False)

    def extra_repr(self) -> str:
        return (
            f"{self.input_width}, {self.leaf_width}, {self.output_width}, "
            f"depth={self._tree_depth}, dropout={self.dropout}, "
            f"train_hardened={self.train_hardened}, region_leak={self.region_leak}, "
            f"usage_mode={self.usage_mode!r}"
        )

    def _apply(self, *args, **kwargs):
        _forget_inference_arrays(self)  # its views would keep the old storage alive
        return super()._apply(*args, **kwargs)

    def get_node_param_group(self) -> dict:
        """The routers' parameters and usage counter, for the package's optimizers."""
        return {"params": [self.node_weights, self.node_biases], "usage": self.node_usage}

    def get_leaf_param_group(self) -> dict:
        """The leaves' parameters and usage counter, for the package's optimizers."""
        return {"params": [self.w1s, self.b1s, self.w2s, self.b2s], "usage": self.leaf_usage}

    def _kernel_params(self) -> tuple[torch.Tensor, ...]:
        """(node_w, node_b, w1t, b1, w2, b2) in the kernels' layout (contiguous copies where a
        view of the parameters is not)."""
        stored = (self.node_weights, self.node_biases, self.w1s, self.b1s, self.w2s, self.b2s)
        return tuple(_kernel_layout(p) for p in _fff_views(stored))

    # ---- masks ------------------------------------------------------------------------------
    def _masks(self, hardened: bool, dtype: torch.dtype, device: torch.device):
        """n_rows -> (swap, drop) tensors for the kernels, None where off (eval mode too)."""
        leak = check_probability(self.region_leak, "region_leak")
        dropout = check_probability(self.dropout, "dropout")
        if not self.training or (leak == 0 and dropout == 0):
            return None
        like: dict[str, Any] = {"dtype": dtype, "device": device}
        depth, n_leaves, leaf_w = self._tree_depth, self.n_leaves, self.leaf_width

        def draw(n_rows):
            swap = drop = None
            if leak > 0 and depth > 0:
                if hardened:  # one decision per level on the visited path
                    swap = torch.empty((n_rows, depth), **like).uniform_(0, 1) < leak
                else:  # the package's draws: one per node, level by level
                    levels = [
                        torch.empty((n_rows, 2**d), **like).uniform_(0, 1) < leak
                        for d in range(depth)
                    ]
                    swap = torch.cat(levels, dim=1)
                swap = swap.to(torch.uint8)
            if dropout > 0:  # the package's nn.Dropout on the leaf activations, as a mask
                width = leaf_w if hardened else n_leaves * leaf_w
                drop = F.dropout(torch.ones((n_rows, width), **like), dropout, training=True)
            return swap, drop

        return draw

    def _entropies(self, x: torch.Tensor) -> torch.Tensor:
        """The package's mean batch entropy of each node's decision, (n_nodes,)."""
        rows = x.reshape(-1, self.input_width).to(self.node_weights.dtype)
        z = torch.addmm(self.node_biases.reshape(1, -1), rows, self.node_weights.t())
        s = torch.sigmoid(z)  # the entropy is symmetric: region-leak swaps do not change it
        p = s.clamp(ENTROPY_EPS, 1 - ENTROPY_EPS)  # the package's compute_entropy_safe
        m = (1 - s).clamp(ENTROPY_EPS, 1 - ENTROPY_EPS)
        return (-p * torch.log(p) - m * torch.log(m)).mean(dim=0)

    # ---- forwards ---------------------------------------------------------------------------
    def training_forward(self, x, return_entropies=False, use_hard_decisions=False):
        """Training forward: y (..., output_width), and with ``return_entropies`` the (n_nodes,)
        mean batch entropies of the decisions. Soft unless ``use_hard_decisions`` or
        ``train_hardened``; region leak and dropout in training mode only."""
        hardened = check_bool(use_hard_decisions, "use_hard_decisions")
        hardened = hardened or check_bool(self.train_hardened, "train_hardened")
        check_choice(self.usage_mode, "usage_mode", USAGE_MODES)
        w = self.node_weights
        masks = self._masks(hardened, w.dtype, w.device)
        y, call = _fff(self, x, "hard" if hardened else "soft", masks)
        if self.usage_mode != "none" and call.saved is not None:
            place = call.place
            with place.scope(), torch.no_grad():
                node, leaf = usage_increments(
                    call.saved, hardened, self.usage_mode, self.n_nodes, self.n_leaves, place.xp
                )
                self.node_usage.add_(place.tensor(node).to(self.node_usage))
                self.leaf_usage.add_(place.tensor(leaf).to(self.leaf_usage))
        call.saved = None
        if return_entropies:
            return y, self._entropies(_input(x, w.dtype))
        return y

    def eval_forward(self, x) -> torch.Tensor:
        """Hard inference (right iff the logit is >= 0), the reached leaf's output with its
        ``b2s``; no region leak or dropout."""
        return _fff_eval(self, x)

    def forward(self, x, return_entropies=False, use_hard_decisions=None):
        """``training_forward`` in training mode, ``eval_forward`` in eval mode (which refuses
        ``return_entropies`` and ``use_hard_decisions=False``, as the package does)."""
        if self.training:
            hard = False if use_hard_decisions is None else use_hard_decisions
            return self.training_forward(x, return_entropies, hard)
        if return_entropies:
            raise ValueError("Cannot return entropies during evaluation.")
        if use_hard_decisions is not None and not use_hard_decisions:
            raise ValueError("Cannot use soft decisions during evaluation.")
        return self.eval_forward(x)
