"""The Module base class: parameters, gradients, state dicts and devices of every fastff layer.

A module keeps its parameters in whatever layout its kernels want (`_params`, internal keys) and
shows them to users in the anchor layout of the state dict: each anchor key maps to an internal
array and an optional axis permutation, so the anchor arrays are writable views, never copies.
Optimizers update those views in place.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any, TypeVar, cast

import numpy as np

from ._validation import (
    HALF_DTYPES,
    as_rows,
    check_cast_in_range,
    check_fits_in_memory,
    check_float_dtype,
    compute_dtype,
    refuse_masked,
)
from .backends import get_ops
from .ops import to_host

MODULE_KINDS: dict[str, type[Module]] = {}  # class name -> class, for rebuilding saved modules
ModuleT = TypeVar("ModuleT", bound="Module")

# The input of the outermost forward_train in progress (Sequential sets it for its children),
# so that a child can tell a batch its caller still holds from an intermediate of its own.
_CALLER_INPUT: contextvars.ContextVar[Any] = contextvars.ContextVar(
    "fastff_caller_input", default=None
)
# Set by fastff.load while it rebuilds a module whose parameters the file then overwrites:
# constructors leave the parameters uninitialised (no random fill, no pages touched).
_SKIP_INIT: contextvars.ContextVar[bool] = contextvars.ContextVar("fastff_skip_init", default=False)


def initialising() -> bool:
    """Whether constructors should fill their parameters (False inside fastff.load)."""
    return not _SKIP_INIT.get()


@contextlib.contextmanager
def uninitialised_parameters():
    """Within the block, constructors allocate parameters without filling them."""
    token = _SKIP_INIT.set(True)
    try:
        yield
    finally:
        _SKIP_INIT.reset(token)


def _memory_root(a):
    """The array that owns a's memory (following views' .base), or None where the memory
    belongs to something that is not an array (a DLPack producer such as a torch tensor, a
    bytes object, an mmap): memory someone else may write."""
    while True:
        base = getattr(a, "base", None)
        if base is None:
            return a
        if not (hasattr(base, "base") and hasattr(base, "shape")):
            return None
        a = base


def keep_for_backward(rows, x):
    """rows, the C-contiguous rows made from a forward_train input x, as an array the backward
    can keep: rows itself where as_rows made new memory (a cast or a contiguous copy), else a
    copy. Otherwise a caller writing into x before backprop (a loader reusing its batch buffer,
    x a view of layer.grads, which backprop adds into) would change the gradients silently.
    Inside Sequential the caller's input is the Sequential's, and its children's intermediate
    outputs are kept without a copy. The copy costs about 1 ms of a 60-90 ms UltraFFF
    training step of the ufb-train shape (768 -> 768, depth 11, 4096 rows) on 2 cores."""
    caller = _CALLER_INPUT.get()
    if caller is None:
        caller = x
    root = _memory_root(rows)
    if root is None or root is _memory_root(caller) or root is caller:
        return rows.copy()
    return rows


@contextlib.contextmanager
def caller_input(x):
    """Within the block, forward_train calls treat x as the caller's input (see
    keep_for_backward); an enclosing Sequential's input wins."""
    if _CALLER_INPUT.get() is not None:
        yield
        return
    token = _CALLER_INPUT.set(x)
    try:
        yield
    finally:
        _CALLER_INPUT.reset(token)


def run_once(backprop):
    """backprop, refusing a second call: gradients would be added twice."""
    done = False

    @functools.wraps(backprop)
    def run(dy):
        nonlocal done
        if done:
            raise RuntimeError(
                "this backprop already ran: calling it again would add the same gradients "
                "twice; run forward_train again for another backward pass"
            )
        dx = backprop(dy)
        done = True
        return dx

    return run


def _contiguous_host(a):
    return np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a


def _aligned_empty(shape, dtype) -> np.ndarray:
    """np.empty whose data starts on a 64-byte boundary (a cache line, an AVX-512 vector).

    Large NumPy arrays start 16 bytes past one (glibc's mmap chunk header), and then every
    vector load of a weight row spans two lines: FFF inference on Fashion-MNIST's shape
    measured 6.7 ms with such weights and 5.8 ms with aligned ones. Rows whose byte length is
    a multiple of 64 are all aligned."""
    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = np.empty(n_bytes + 64, dtype=np.uint8)
    start = -buffer.ctypes.data % 64
    return buffer[start : start + n_bytes].view(dtype).reshape(shape)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = _aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _aligned_zeros(shape, dtype) -> np.ndarray:
    out = _aligned_empty(shape, dtype)
    out.fill(0)
    return out


def build_module(kind: str, config: dict) -> Module:
    """Rebuild a module from its kind (class name) and get_config() output."""
    if kind not in MODULE_KINDS:  # kinds register on import (fastff.io imports fastff.nn)
        raise KeyError(f"unknown module kind {kind!r}; known: {sorted(MODULE_KINDS)}")
    return MODULE_KINDS[kind].from_config(config)


class Module:
    """Base class of every fastff layer and fastff.nn module.

    The protocol: ``module(x)`` is inference; ``module.forward_train(x) -> (y, backprop)``, and
    ``backprop(dy) -> dx`` (dy of y's shape, dx of x's) adds parameter gradients into
    ``module.grads``; ``forward_train(x, input_grad=False)``: x needs no gradient, backprop
    returns None. ``state_dict()`` / ``load_state_dict()``, ``params`` and ``grads`` use the
    anchor keys and shapes (for a container, the children's keys prefixed "name.");
    ``named_parameters()`` yields (name, parameter, gradient) views that optimizers update in
    place. ``to("cuda")`` / ``to("cpu")`` moves everything; ``get_config()`` and
    ``from_config()`` rebuild a module for ``fastff.save`` / ``fastff.load``.

    Subclasses fill ``_params`` (arrays in the kernels' layout) and ``_anchor`` (anchor key ->
    (internal key, axis permutation or None)) in their constructor.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):  # private bases (nn._Elementwise) are not kinds
            MODULE_KINDS[cls.__name__] = cls

    @classmethod
    def from_config(cls, config: dict) -> Module:
        """Inverse of get_config()."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        return cls(**config)

    def __init__(self, dtype=np.float32, *, half: bool = False):
        # the parameters' np.dtype (parameterless modules: None); with `half`, bfloat16 and
        # float16 storage too, computed in float32 (compute_dtype: inputs, outputs)
        self.dtype: Any = check_float_dtype(dtype, half=half)
        self.compute_dtype: Any = compute_dtype(self.dtype)
        self.device = "cpu"
        self._params: dict[str, Any] = {}  # internal key -> array (kernel layout)
        self._grads: dict[str, Any] | None = None  # allocated on first use
        self._anchor: dict[str, tuple[str, tuple | None]] = {}  # anchor key -> (internal, axes)
        self._version = 0  # bumped whenever parameters change outside forward/backward

    # ---- structure -------------------------------------------------------------------------
    def children(self) -> Iterator[tuple[str, Module]]:
        """(name, module) of direct sub-modules; none for a leaf layer."""
        return iter(())

    def modules(self) -> Iterator[Module]:
        """This module and every sub-module, depth first."""
        yield self
        for _, child in self.children():
            yield from child.modules()

    @property
    def ops(self):
        """The backend (array module and kernels) of this module's device."""
        return get_ops(self.device)

    # ---- parameters and gradients ----------------------------------------------------------
    def _view(self, store, key):
        internal, axes = self._anchor[key]
        arr = store[internal]
        return arr if axes is None else arr.transpose(axes)

    def _allocate_grads(self):
        if self._grads is None:
            n_bytes = sum(int(p.nbytes) for p in self._params.values())
            check_fits_in_memory(n_bytes, f"the gradients of {type(self).__name__}")
            xp = self.ops.xp
            # aligned on the CPU like the weights: the backward's row updates then never split
            # a cache line (UltraFFF training step of the ufb-train shape: 19.2 -> 17.0 ms)
            self._grads = {
                k: _aligned_zeros(p.shape, p.dtype) if xp is np else xp.zeros_like(p)
                for k, p in self._params.items()
            }
        return self._grads

    def named_parameters(self, prefix: str = ""):
        """Yield (name, parameter, gradient) with anchor names and shapes; arrays are views of
        the module's storage, so in-place updates reach the kernels."""
        grads = self._allocate_grads() if self._params else None
        for key in self._anchor:
            yield prefix + key, self._view(self._params, key), self._view(grads, key)
        for name, child in self.children():
            yield from child.named_parameters(prefix + name + ".")

    @property
    def params(self) -> dict:
        """Parameters by state-dict key (writable views). Handing out writable views counts as
        a change of the parameters: a backprop pending from an earlier forward_train raises
        rather than mix edited weights with the forward's activations (read them with
        state_dict() between forward_train and backprop)."""
        self.mark_updated()
        return {name: p for name, p, _ in self.named_parameters()}

    @property
    def grads(self) -> dict:
        """Accumulated gradients by state-dict key, same shapes as state_dict()."""
        return {name: g for name, _, g in self.named_parameters()}

    def zero_grad(self) -> None:
        """Set every accumulated gradient to zero (backprop adds into them)."""
        for m in self.modules():
            if m._grads is not None:
                for g in m._grads.values():
                    g.fill(0)

    def mark_updated(self) -> None:
        """Record that parameters changed (optimizers call this): pending backprops go stale."""
        for m in self.modules():
            m._version += 1

    def _backprop_inputs(self, dy, version: int, device: str, lead: tuple, width: int):
        """The checks every backprop starts with: the module is unchanged since its forward, and
        dy has y's shape lead + (width,). Returns dy as rows and the gradient store."""
        self._check_fresh(version, device)
        dy_rows, dy_lead = as_rows(dy, width, self.dtype, self.ops.xp, name="dy")
        if dy_lead != lead:
            raise ValueError(
                f"dy must have the shape of y, {lead + (width,)}, got {dy_lead + (width,)}"
            )
        return dy_rows, self._allocate_grads()

    def _check_fresh(self, version: int, device: str) -> None:
        if version != self._version or device != self.device:
            raise RuntimeError(
                f"stale backprop: the parameters of this {type(self).__name__} changed (optimizer "
                "step, load_state_dict or .to()) after forward_train; run forward_train again"
            )

    # ---- state dicts -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Copies of the parameters as C-contiguous NumPy arrays, anchor keys and shapes."""
        return {
            name: np.array(self.ops.to_numpy(p), order="C")
            for name, p, _ in self._iter_params_only()
        }

    def _iter_params_only(self, prefix: str = ""):
        for key in self._anchor:
            yield prefix + key, self._view(self._params, key), None
        for name, child in self.children():
            yield from child._iter_params_only(prefix + name + ".")

    def load_state_dict(self, state: dict) -> None:
        """Replace every parameter from `state` (NumPy or CuPy arrays, anchor keys and shapes).

        Everything is checked first: missing or unexpected keys, shapes, non-numeric dtypes and
        values that overflow this module's dtype. On any error nothing is changed.
        """
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a dict of arrays, got {type(state).__name__}")
        for name in state.keys():
            refuse_masked(state[name], f"state[{name!r}]")
        targets = {name: p for name, p, _ in self._iter_params_only()}
        state = self._accept_extra_state(dict(state))
        missing = sorted(set(targets) - set(state))
        unexpected = sorted(set(state) - set(targets))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        staged = {}
        for name, target in targets.items():
            value = state[name]
            src = to_host(value)
            if src.dtype.kind not in "fiu" and src.dtype not in HALF_DTYPES:
                raise TypeError(
                    f"state[{name!r}] must be a real numeric array, got dtype {src.dtype}"
                )
            if tuple(src.shape) != tuple(target.shape):
                raise ValueError(
                    f"state[{name!r}] has shape {tuple(src.shape)}, expected {tuple(target.shape)}"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                converted = src.astype(self.dtype)
            if src.dtype.kind == "f":  # a weight, not an input: the remedy is the dtype
                check_cast_in_range(
                    src,
                    converted,
                    self.dtype,
                    np,
                    f"state[{name!r}]",
                    "keep these weights in a wider dtype (float32 reaches 3.4e38, bfloat16 too)",
                )
            staged[name] = converted
        for m_prefix, m in self._prefixed_modules():
            for key in m._anchor:
                m._view(m._params, key)[...] = m.ops.asarray(staged[m_prefix + key])
        self.mark_updated()

    def _accept_extra_state(self, state: dict) -> dict:
        """Hook: check and drop entries a foreign state dict may carry (e.g. FFF's `depth`)."""
        return state

    def _prefixed_modules(self, prefix: str = ""):
        yield prefix, self
        for name, child in self.children():
            yield from child._prefixed_modules(prefix + name + ".")

    # ---- devices ---------------------------------------------------------------------------
    def to(self: ModuleT, device: str) -> ModuleT:
        """Move parameters and gradients to "cpu" (NumPy) or "cuda" (CuPy); returns self."""
        ops = get_ops(device)  # raises a clear error for unknown devices or missing CUDA
        if ops.xp is not np:  # before anything moves: a refused dtype leaves the model whole
            for half in {m.dtype for m in self.modules() if m.dtype in HALF_DTYPES}:
                try:
                    ops.asarray(np.zeros(1, dtype=half))
                except (TypeError, ValueError, NotImplementedError) as exc:
                    raise TypeError(
                        f"this CuPy cannot hold {half.name} arrays ({exc}); bfloat16 on CUDA "
                        "needs CuPy 14 or newer with ml_dtypes; float16 works with any CuPy "
                        "(model.astype(numpy.float16))"
                    ) from exc
        for m in self.modules():
            if m.device == device:
                continue
            # host arrays go over contiguous (a CPU layout may keep parameters as strided views)
            m._params = {k: ops.asarray(_contiguous_host(v)) for k, v in m._params.items()}
            if m._grads is not None:
                m._grads = {
                    k: _aligned_copy(to_host(v)) if ops.xp is np else ops.asarray(v)
                    for k, v in m._grads.items()
                }
            m._on_device_change(ops)
            m.device = device
            m._version += 1
        return self

    def _on_device_change(self, ops) -> None:
        """Hook for modules holding device arrays outside `_params`."""

    def _check_trainable(self, what: str) -> None:
        """Raise TypeError if this module or one inside it stores half precision: such layers
        are for inference (``what``, e.g. "forward_train", names the refused use)."""
        half = next((m for m in self.modules() if m.dtype in HALF_DTYPES), None)
        if half is not None:
            name = half.dtype.name
            raise TypeError(
                f"{what} of a {name} {type(half).__name__}: half-precision layers are for "
                f"inference; train in float32 and convert with model.astype({name!r})"
            )

    def astype(self: ModuleT, dtype) -> ModuleT:
        """A copy of this module with its parameters stored in `dtype`, on the same device:
        float32, float64, or for UltraFFF, FFF and nn.Linear "bfloat16" / numpy.float16 (half
        precision, for inference: train in float32, then convert). Values round to nearest;
        values beyond the new type's range raise ValueError and nothing is converted."""
        config = self.get_config()
        if self.dtype is not None:
            config["dtype"] = check_float_dtype(dtype, half=True).name
        with uninitialised_parameters():
            new = cast(ModuleT, type(self).from_config(config))
        if self._params:
            new.load_state_dict(self.state_dict())
        return new.to(self.device)

    def get_config(self) -> dict:
        """Constructor arguments that rebuild this module (used by save/load)."""
        raise NotImplementedError(f"{type(self).__name__} does not define get_config()")

    def n_parameters(self) -> int:
        """Number of parameter values (the sum of the state dict's array sizes)."""
        return sum(int(np.prod(p.shape)) for _, p, _ in self._iter_params_only())
