"""Batch inference on Dask: ``predict(layer, x)`` maps a fastff module over a dask array by rows.

``import fastff.dask`` (needs ``dask[array]``; ``distributed`` for a cluster, ``pip install
"fastff[dask]"``); a plain ``import fastff`` does not import this module::

    import dask.array as da, fastff, fastff.dask
    x = da.from_array(np.load("rows.npy", mmap_mode="r"), chunks=(65536, -1))
    y = fastff.dask.predict(layer, x)          # lazy dask array of shape (..., out)
    y.compute()                                # or y.to_zarr(...), y.store(...)

Each block of rows is one task calling ``layer(block)`` (hard inference), so the result equals
``layer(x.compute())`` bitwise. The layer enters the graph once, as a single ``dask.delayed``
object: it is pickled (fastff modules pickle with the standard protocol) and shipped once to
each worker that needs it, not once per task.

Threads: a fastff kernel uses ``fastff.num_threads``'s resolution (scoped value, then
``set_num_threads``, then ``OMP_NUM_THREADS``). ``distributed``'s nannies start workers with
``OMP_NUM_THREADS=1`` by default, so on a cluster each task runs one fastff thread per worker
thread unless ``n_threads`` says otherwise; ``n_threads=k`` wraps every block's call in
``fastff.num_threads(k)``.
"""

from __future__ import annotations

from typing import Any

import dask
import dask.array as da
import numpy as np

from ._threads import num_threads
from ._validation import check_int
from .module import Module

__all__ = ["predict"]


def _predict_block(block, layer, n_threads):
    if n_threads is None:
        return layer(block)
    with num_threads(n_threads):
        return layer(block)


def _output_dtype(layer: Any) -> np.dtype:
    """The dtype of the layer's outputs: float32 for half-precision storage."""
    return np.dtype(layer.compute_dtype if layer.compute_dtype is not None else layer.dtype)


def _widths(layer: Any, x_width: int) -> tuple[int, int]:
    """(input, output) width: from the config of a layer, else by one probe row (Sequential)."""
    config = layer.get_config()
    if "input_width" in config and "output_width" in config:
        return int(config["input_width"]), int(config["output_width"])
    probe = layer(np.zeros((1, x_width), dtype=_output_dtype(layer)))
    return x_width, int(probe.shape[-1])


def predict(layer: Module, x, *, n_threads: int | None = None):
    """``layer(x)`` for a dask array ``x`` of shape (..., input_width), lazily, block by block.

    x is chunked along its leading axes as the caller chose; its last axis is rechunked to a
    single chunk if it is split. Returns a dask array of shape (..., output_width) and the
    layer's compute dtype (float32 for half-precision weights), with x's leading chunks. The
    layer must live on the CPU (``layer.to("cpu")``).
    ``n_threads``: fastff threads per task (default: the worker's own setting, see the module
    doc).
    """
    if not isinstance(layer, Module):
        raise TypeError(f"layer must be a fastff Module, got {type(layer).__name__}")
    if layer.device != "cpu":
        raise ValueError(
            f"predict needs a layer on the CPU (dask blocks are NumPy arrays), got device "
            f"{layer.device!r}; call layer.to('cpu') first"
        )
    if not isinstance(x, da.Array):
        raise TypeError(f"x must be a dask.array.Array, got {type(x).__name__}")
    if n_threads is not None:
        n_threads = check_int(n_threads, "n_threads", 1)
    if x.ndim == 0:
        raise ValueError("x must have shape (..., input_width), got a 0-d array")
    in_width, out_width = _widths(layer, int(x.shape[-1]))
    if x.shape[-1] != in_width:
        raise ValueError(f"x must have shape (..., {in_width}), got shape {tuple(x.shape)}")
    if x.dtype.kind not in "fiu":
        raise TypeError(
            f"x must hold real numbers (float or integer) of shape (..., {in_width}), "
            f"got dtype {x.dtype}"
        )
    if len(x.chunks[-1]) != 1:
        x = x.rechunk({x.ndim - 1: -1})
    dtype = _output_dtype(layer)
    # one graph node for the layer, keyed by its contents: pickled once, sent once per worker
    layer_node = dask.delayed(layer, pure=True)
    return da.map_blocks(
        _predict_block,
        x,
        layer_node,
        n_threads,
        dtype=dtype,
        chunks=x.chunks[:-1] + ((out_width,),),
        meta=np.empty((0,) * x.ndim, dtype=dtype),
        token="fastff-predict",
    )
