"""Weights to and from the PyTorch projects fastff mirrors.

- ``ultra_from_torch(source)`` builds a :class:`fastff.UltraFFF` from an UltraFastBERT
  intermediate FFF module or its state dict (``linear_in.weight`` (T*n_nodes, in),
  ``linear_in.bias`` (T*n_nodes,), ``linear_out.weight`` (out, T*n_nodes)).
- ``fff_from_torch(source)`` builds a :class:`fastff.FFF` from a ``fastfeedforward.FFF`` module
  or its state dict (``node_weights``, ``node_biases``, ``w1s``, ``b1s``, ``w2s``, ``b2s`` and
  ``depth``; ``node_usage`` / ``leaf_usage`` when the module tracks usage).
- ``to_torch_state_dict(layer)`` is the reverse: a dict of torch tensors with the keys and
  shapes those modules' ``load_state_dict`` expects.

Widths and depth are read from the weight shapes. A source may be a torch module (anything with
a ``state_dict()`` method), a mapping of torch tensors, NumPy or CuPy arrays; ``prefix`` picks
one layer out of a whole model's state dict (e.g. ``"encoder.layer.3.ffn."``). Reading needs no
torch import: tensors are detached and copied to the host. A bfloat16 or float16 state dict
(UltraFastBERT publishes bfloat16) builds a layer stored in that half precision, bit for bit,
unless ``dtype=`` asks for another; ``to_torch_state_dict`` of a half layer gives tensors of
torch's matching dtype. Only ``to_torch_state_dict`` imports torch.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._validation import BFLOAT16, check_int
from .layers import FFF, UltraFFF
from .module import Module

ULTRA_KEYS = ("linear_in.weight", "linear_in.bias", "linear_out.weight")
FFF_KEYS = ("node_weights", "node_biases", "w1s", "b1s", "w2s", "b2s")
# torch activation module class -> fastff activation name. GELU only in its exact (erf) form.
TORCH_ACTIVATIONS = {"ReLU": "relu", "GELU": "gelu", "Identity": "identity"}


def _to_numpy(value) -> np.ndarray:
    """A torch tensor, CuPy array or array-like as a NumPy array on the host."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without importing torch
        tensor = value.detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":  # NumPy's bfloat16 is ml_dtypes': same bits
            if BFLOAT16 is None:
                return tensor.float().numpy()
            torch = sys.modules["torch"]  # loaded: this is one of its tensors
            return tensor.contiguous().view(torch.int16).numpy().view(BFLOAT16)
        return tensor.numpy()
    if hasattr(value, "__cuda_array_interface__") and hasattr(value, "get"):  # CuPy
        return value.get()
    return np.asarray(value)


def _is_module(source) -> bool:
    return callable(getattr(source, "state_dict", None))


def _read_state(source, prefix: str, keys, caller: str) -> dict:
    """The entries of `source` under `prefix` (prefix removed) as NumPy arrays; all of `keys`
    must be there."""
    if not isinstance(prefix, str):
        raise TypeError(f"prefix must be a string, got {type(prefix).__name__}")
    if _is_module(source):
        state = source.state_dict()
    elif isinstance(source, Mapping):
        state = source
    else:
        raise TypeError(
            f"{caller} takes a torch module or a state dict (a mapping of tensors or "
            f"arrays), got {type(source).__name__}"
        )
    state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    missing = [k for k in keys if k not in state]
    if missing:
        found = sorted(state)
        shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
        raise ValueError(
            f"{caller}: the state dict has no {', '.join(prefix + k for k in missing)}"
            f" (keys found under prefix {prefix!r}: {shown or 'none'}); pass prefix= "
            "to pick one layer out of a larger model"
        )
    return {k: _to_numpy(v) for k, v in state.items()}


def _check_ndim(state: dict, expected: dict) -> None:
    for key, ndim in expected.items():
        if state[key].ndim != ndim:
            raise ValueError(
                f"{key} must have {ndim} dimensions, got shape {tuple(state[key].shape)}"
            )


def _torch_activation(module, default: str) -> str:
    """The fastff name of `module.activation` (an instance or class of torch.nn.ReLU, GELU or
    Identity); `default` when the module has none."""
    act = getattr(module, "activation", None)
    if act is None:
        return default
    cls = act if isinstance(act, type) else type(act)
    name = TORCH_ACTIVATIONS.get(cls.__name__)
    if name is None or getattr(act, "approximate", "none") != "none":
        raise ValueError(
            f"the module's activation {act!r} has no fastff equivalent (fastff has "
            f"ReLU, exact GELU and Identity); pass activation= to choose one"
        )
    return name


def _default_dtype(state: dict, keys) -> np.dtype:
    """The layer dtype for the weights state[k], k in keys: bfloat16 or float16 when every one
    of them has it (kept bit for bit), float64 when any is float64, else float32 (torch's
    default). A half dtype is not kept for a state that mixes it with wider weights: those
    would be rounded."""
    dtypes = {np.dtype(state[k].dtype) for k in keys}
    if len(dtypes) == 1 and dtypes <= {np.dtype(np.float16), BFLOAT16}:
        return dtypes.pop()
    return np.dtype(np.float64) if np.dtype(np.float64) in dtypes else np.dtype(np.float32)


def tree_shape(total_nodes: int, parallel_size=None, depth=None) -> tuple:
    """(parallel_size, depth) with ``parallel_size * (2**(depth+1) - 1) == total_nodes``, the row
    count of UltraFastBERT's ``linear_in.weight``.

    Several splits usually fit (always ``depth=0, parallel_size=total_nodes``), so give
    ``parallel_size`` or ``depth`` unless only one remains; a ValueError lists the candidates.
    """
    total_nodes = check_int(total_nodes, "total_nodes", 1)
    candidates = []
    for d in range(total_nodes.bit_length()):
        n_nodes = 2 ** (d + 1) - 1
        if total_nodes % n_nodes == 0:
            candidates.append((total_nodes // n_nodes, d))
    given = []
    if parallel_size is not None:
        parallel_size = check_int(parallel_size, "parallel_size", 1)
        candidates = [c for c in candidates if c[0] == parallel_size]
        given.append(f"parallel_size={parallel_size}")
    if depth is not None:
        depth = check_int(depth, "depth", 0)
        candidates = [c for c in candidates if c[1] == depth]
        given.append(f"depth={depth}")
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"linear_in.weight has {total_nodes} rows, which is not parallel_size * "
            f"(2**(depth+1) - 1) with {' and '.join(given)}"
        )
    options = "; ".join(f"parallel_size={t}, depth={d}" for t, d in candidates)
    raise ValueError(
        f"linear_in.weight has {total_nodes} rows = parallel_size * "
        f"(2**(depth+1) - 1) in {len(candidates)} ways ({options}): pass "
        "parallel_size= or depth="
    )


def ultra_from_torch(
    source, *, parallel_size=None, depth=None, prefix: str = "", **options: Any
) -> UltraFFF:
    """An UltraFFF holding the weights of an UltraFastBERT intermediate FFF.

    source: the torch module (its ``parallel_size``, ``depth`` and ``activation`` attributes are
    used when present) or its state dict: ``linear_in.weight`` (T*n_nodes, input_width),
    ``linear_in.bias`` (T*n_nodes,), ``linear_out.weight`` (output_width, T*n_nodes), with
    n_nodes = 2**(depth+1) - 1. A state dict alone does not fix T and depth: give
    ``parallel_size`` or ``depth`` (see :func:`tree_shape`).

    options: UltraFFF keyword arguments (``activation``, default the module's or "gelu";
    ``dtype``, default the weights' own where fastff stores it: float64 (any weight),
    bfloat16 or float16 (every weight); float32 otherwise). The weights are checked and
    copied by ``load_state_dict``. Returns the layer on the CPU.
    """
    module = source if _is_module(source) else None
    state = _read_state(source, prefix, ULTRA_KEYS, "ultra_from_torch")
    _check_ndim(state, {"linear_in.weight": 2, "linear_in.bias": 1, "linear_out.weight": 2})
    total_nodes, input_width = state["linear_in.weight"].shape
    output_width = state["linear_out.weight"].shape[0]
    if module is not None:
        if parallel_size is None and getattr(module, "parallel_size", None) is not None:
            parallel_size = int(module.parallel_size)
        if depth is None and getattr(module, "depth", None) is not None:
            depth = int(module.depth)
        if "activation" not in options:  # not setdefault: an explicit choice skips the check
            options["activation"] = _torch_activation(module, "gelu")
    parallel_size, depth = tree_shape(total_nodes, parallel_size, depth)
    options.setdefault("dtype", _default_dtype(state, ULTRA_KEYS))
    layer = UltraFFF(input_width, output_width, depth, parallel_size, **options)
    layer.load_state_dict(state)
    return layer


def fff_from_torch(source, *, prefix: str = "", **options: Any) -> FFF:
    """An FFF holding the weights of a ``fastfeedforward.FFF``.

    source: the torch module or its state dict: ``node_weights`` (n_nodes, input_width),
    ``node_biases`` (n_nodes, 1), ``w1s`` (n_leaves, input_width, leaf_width), ``b1s``
    (n_leaves, leaf_width), ``w2s`` (n_leaves, leaf_width, output_width), ``b2s``
    (n_leaves, output_width), and optionally ``depth`` (checked against n_leaves = 2**depth)
    and the usage counters.

    options: FFF keyword arguments. From a module, ``activation``, ``dropout``,
    ``train_hardened``, ``region_leak`` and ``usage_mode`` default to the module's; from a state
    dict to FFF's defaults. ``dtype`` defaults to float64 if any weight is float64, to
    bfloat16 or float16 if every weight is, else to float32.
    Returns the layer on the CPU.
    """
    module = source if _is_module(source) else None
    state = _read_state(source, prefix, FFF_KEYS, "fff_from_torch")
    _check_ndim(
        state, {"node_weights": 2, "node_biases": 2, "w1s": 3, "b1s": 2, "w2s": 3, "b2s": 2}
    )
    n_leaves, input_width, leaf_width = state["w1s"].shape
    output_width = state["w2s"].shape[2]
    if n_leaves < 1 or n_leaves & (n_leaves - 1):
        raise ValueError(f"w1s must hold 2**depth leaves, got {n_leaves}")
    depth = n_leaves.bit_length() - 1
    if module is not None:
        for name in ("dropout", "train_hardened", "region_leak", "usage_mode"):
            if getattr(module, name, None) is not None:
                options.setdefault(name, getattr(module, name))
        if "activation" not in options:
            options["activation"] = _torch_activation(module, "relu")
    options.setdefault("dtype", _default_dtype(state, FFF_KEYS))
    layer = FFF(input_width, leaf_width, output_width, depth, **options)
    layer.load_state_dict(state)  # also checks the `depth` entry against the leaf count
    return layer


def _torch_tensor(torch, a: np.ndarray):
    """A CPU torch tensor holding a copy of `a`; bfloat16 (which torch.from_numpy does not
    know) through its bits."""
    if BFLOAT16 is not None and a.dtype == BFLOAT16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def to_torch_state_dict(layer: Module) -> dict:
    """The parameters of a fastff module as CPU torch tensors, keyed as the PyTorch projects
    key them: an UltraFFF gives UltraFastBERT's ``linear_in.weight``, ``linear_in.bias``,
    ``linear_out.weight``; an FFF the ``fastfeedforward`` package's keys plus ``depth`` (a 0-d
    int64 tensor) and, with usage tracking, ``node_usage`` / ``leaf_usage`` (float32, as the
    package stores them). nn modules give their state_dict() keys (``Sequential`` children
    prefixed "0.", "1.", ... like torch.nn.Sequential). Tensors are copies in the layer's dtype.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("to_torch_state_dict needs PyTorch (pip install torch)") from exc
    if not isinstance(layer, Module):
        raise TypeError(f"layer must be a fastff module, got {type(layer).__name__}")
    for prefix, module in layer._prefixed_modules():
        if isinstance(module, FFF) and module.master_leaf:
            raise ValueError(
                f"{prefix or 'the layer'} is an FFF with a master leaf, which the "
                "fastfeedforward package's FFF does not have; its state_dict() holds the "
                "master.* arrays beside the package's keys"
            )
    out = {k: _torch_tensor(torch, v) for k, v in layer.state_dict().items()}
    for prefix, module in layer._prefixed_modules():
        if isinstance(module, FFF):
            out[prefix + "depth"] = torch.tensor(module.depth, dtype=torch.long)
            if module.usage_mode != "none":
                for key in ("node_usage", "leaf_usage"):
                    usage = module.ops.to_numpy(getattr(module, key)).astype(np.float32)
                    out[prefix + key] = torch.from_numpy(usage)
    return out
