"""`python -m fastff bench`: fastff kernels against the dense feedforward layer they replace.

Protocol (../shared/BENCHMARKS.md): same dtype and thread count on both sides, one warm-up, the
median and min-max of >= 5 timed repetitions, ratio = dense time / fastff time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy.special import erf

from ._timing import median_min_max


@dataclass
class Case:
    """One measured comparison: `make(storage)` returns (dense_fn, fastff_fn, rows, info,
    peers), peers mapping a peer's name to its function (or None: no counterpart); storage is
    the fastff layer's parameter dtype (the dense FF and the inputs stay float32)."""

    name: str
    kind: str
    make: Callable
    params: dict = field(default_factory=dict)


def _dense_ff(rng, in_w, width, out_w, dtype):
    """Weights of the baseline act(x @ w1 + b1) @ w2, pre-transposed so both are plain GEMMs."""
    w1 = (rng.standard_normal((in_w, width)) / np.sqrt(in_w)).astype(dtype)
    b1 = np.zeros(width, dtype)
    w2 = (rng.standard_normal((width, out_w)) / np.sqrt(width)).astype(dtype)
    return w1, b1, w2


# ---- the NumPy baseline, written as a careful NumPy user would: both matmuls are plain BLAS
# GEMMs on the bench's threads, and the activation runs in place over row chunks that stay in
# cache, spread over the same threads (scipy's erf runs on one core and releases the GIL). The
# textbook form, reference.dense_forward, is the tests' specification, not a baseline: its GELU
# turns float32 into float64 (np.sqrt(2) is a float64 scalar), so its second GEMM ran in float64
# on a converted copy of w2, after a single-threaded GELU over whole-matrix temporaries. `ufb`
# took 500 ms that way and about 300 ms this way (PyTorch: 195 ms); one row, 2.4 ms and 0.55.

_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327
_pools: dict[int, ThreadPoolExecutor] = {}


def _act_chunk(activation: str, z: np.ndarray, grad: np.ndarray | None) -> None:
    """z <- act(z) in place; grad (if given) <- act'(z) of the z passed in."""
    if activation == "relu":
        if grad is not None:
            np.greater(z, 0, out=grad)
        np.maximum(z, 0, out=z)
    elif activation == "gelu":
        cdf = z * z.dtype.type(_SQRT_HALF)
        erf(cdf, out=cdf)
        cdf += 1
        cdf *= 0.5  # Phi(z)
        if grad is not None:  # Phi(z) + z * phi(z)
            np.multiply(z, z, out=grad)
            grad *= -0.5
            np.exp(grad, out=grad)
            grad *= z.dtype.type(_INV_SQRT_2PI)
            grad *= z
            grad += cdf
        z *= cdf
    elif activation == "identity":
        if grad is not None:
            grad.fill(1)
    else:
        raise ValueError(activation)


def _dense_act(activation: str, z: np.ndarray, grad: np.ndarray | None = None) -> None:
    """_act_chunk over chunks of about 256 KB of z's rows, on fastff's thread count."""
    from . import get_num_threads

    threads = get_num_threads()
    step = max(1, (1 << 16) // max(z.shape[1], 1))
    starts = range(0, z.shape[0], step)
    chunks = [(z[s : s + step], None if grad is None else grad[s : s + step]) for s in starts]
    if threads == 1 or len(chunks) == 1:
        for zc, gc in chunks:
            _act_chunk(activation, zc, gc)
        return
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads)
    list(_pools[threads].map(lambda c: _act_chunk(activation, *c), chunks))


def _dense_forward(x, w1, b1, w2, activation):
    """act(x @ w1 + b1) @ w2: reference.dense_forward's result, computed as above."""
    z = x @ w1
    z += b1
    _dense_act(activation, z)
    return z @ w2


def _dense_train_step(x, w1, b1, w2, activation, dy):
    """Forward (y) and backward of the dense FF for the output gradient dy: returns y, dx and
    the weight gradients dw1, db1, dw2."""
    z = x @ w1
    z += b1
    act_grad = np.empty_like(z)
    _dense_act(activation, z, act_grad)  # z becomes h = act(z)
    y = z @ w2
    dw2 = z.T @ dy
    dz = dy @ w2.T
    dz *= act_grad
    return y, dz @ w1.T, x.T @ dz, dz.sum(axis=0), dw2


# ---- peers: extra columns when installed, never required (../shared/BENCHMARKS.md) ----------
FLOAT32_PEER = "fastff-float32"
PEERS = {
    "torch": "PyTorch's dense FF on the same weights (its CPU BLAS, same thread count)",
    "fastfeedforward": "the fastfeedforward package's FFF, hard inference (router-leaf only)",
    "fastff.torch": "fastff.torch.FFF on the same weights: fastff's kernels inside a torch module",
    FLOAT32_PEER: "fastff with float32 weights, the layer the half-precision one was rounded "
    "from (with --dtype bfloat16/float16)",
}
# What a peer needs installed, where that is not the peer's own name.
_PEER_NEEDS = {"fastff.torch": "torch"}


def installed_peers() -> list[str]:
    import importlib.util

    return [
        name
        for name in PEERS
        if name != FLOAT32_PEER
        and importlib.util.find_spec(_PEER_NEEDS.get(name, name)) is not None
    ]


def _torch_dense(x, w1, b1, w2, activation, dy=None):
    """The dense FF in PyTorch: forward, or with dy forward + backward (dx and the three
    weight gradients, like _dense_train_step). None without torch."""
    if "torch" not in installed_peers():
        return None
    import torch

    act = {"identity": lambda z: z, "relu": torch.relu, "gelu": torch.nn.functional.gelu}
    f = act[activation]  # torch's gelu is the exact (erf) one, like fastff's
    tx, tw1, tb1, tw2 = (torch.from_numpy(a) for a in (x, w1, b1, w2))  # no copies
    if dy is None:

        def forward():
            with torch.no_grad():
                return f(tx @ tw1 + tb1) @ tw2

        return forward
    leaves = [t.detach().requires_grad_() for t in (tx, tw1, tb1, tw2)]
    tdy = torch.from_numpy(dy)

    def train_step():
        lx, lw1, lb1, lw2 = leaves
        for t in leaves:
            t.grad = None
        (f(lx @ lw1 + lb1) @ lw2).backward(tdy)
        return [t.grad for t in leaves]  # dx, dw1, db1, dw2

    return train_step


def _package_fff(in_w, leaf_w, out_w, depth, x, activation):
    """The fastfeedforward package's FFF of the same shape (its own random weights), hard
    inference through its eval forward. None without the package."""
    if "fastfeedforward" not in installed_peers() or activation != "relu":
        return None
    import fastfeedforward
    import torch

    torch.manual_seed(0)
    module = fastfeedforward.FFF(in_w, leaf_w, out_w, depth).eval()
    tx = torch.from_numpy(x)

    def forward():
        with torch.no_grad():
            return module(tx)

    return forward


def _fastff_torch_fff(layer, x):
    """fastff.torch.FFF holding `layer`'s weights, hard inference under torch.no_grad (the
    eval forward a PyTorch model runs). None without torch."""
    if "fastff.torch" not in installed_peers():
        return None
    import torch

    import fastff.torch

    from .interop import to_torch_state_dict

    dtype = {np.float32: torch.float32, np.float64: torch.float64}.get(layer.dtype.type)
    if dtype is None:
        return None
    module = fastff.torch.FFF(
        layer.input_width,
        layer.leaf_width,
        layer.output_width,
        layer.depth,
        layer.activation,
        dtype=dtype,
    )
    module.load_state_dict(to_torch_state_dict(layer))
    module.eval()
    tx = torch.from_numpy(x)

    def forward():
        with torch.no_grad():
            return module(tx)

    return forward


# Above this dense width the baseline is not run: its weights alone would take gigabytes and
# one forward minutes. The fastff side is still timed (the `scaling` series goes to depth 20).
MAX_DENSE_WIDTH = 1 << 15


def make_ultra(
    in_w,
    out_w,
    depth,
    batch,
    *,
    parallel_size=1,
    activation="gelu",
    train=False,
    dtype=np.float32,
    device="cpu",
):
    from .layers import UltraFFF

    def make(storage=dtype):
        from ._validation import available_memory_bytes

        storage = np.dtype(storage)
        if storage != np.dtype(dtype) and train:
            raise ValueError(f"{storage.name} layers are for inference")
        rng = np.random.default_rng(0)
        # built in its storage type: the float32 layer's draws, rounded (as .astype gives)
        layer = UltraFFF(in_w, out_w, depth, parallel_size, activation, dtype=storage, seed=0)
        width = layer.training_width
        x = rng.standard_normal((batch, in_w)).astype(dtype)
        info: dict[str, float] = {
            "dense_width": width,
            "neurons_per_row": layer.neurons_per_inference,
        }
        if device == "cpu" and not train:
            info["weights_read_mb"] = _distinct_weight_bytes(layer, x) / 1e6
        peers: dict = {}
        full_bytes = layer.n_parameters() * np.dtype(dtype).itemsize
        full = None
        if storage != np.dtype(dtype) and full_bytes < available_memory_bytes() / 3:
            # the float32 layer it was rounded from, timed in the same run where it fits
            full = UltraFFF(in_w, out_w, depth, parallel_size, activation, dtype=dtype, seed=0)
            peers[FLOAT32_PEER] = lambda: full(x)
        if width > MAX_DENSE_WIDTH and device == "cpu" and not train:

            def fff():
                layer(x)

            return None, fff, batch, info, peers
        w1, b1, w2 = _dense_ff(rng, in_w, width, out_w, dtype)
        if device == "cuda":
            return _make_cuda_pair(layer, x, (w1, b1, w2), activation, train, full)
        dy = rng.standard_normal((batch, out_w)).astype(dtype) if train else None
        if train:

            def fff():
                _, backprop = layer.forward_train(x)
                backprop(dy)

            def dense():
                _dense_train_step(x, w1, b1, w2, activation, dy)
        else:

            def fff():
                layer(x)

            def dense():
                _dense_forward(x, w1, b1, w2, activation)

        peers["torch"] = _torch_dense(x, w1, b1, w2, activation, dy)
        return dense, fff, batch, info, peers

    return make


def _distinct_weight_bytes(layer, x) -> int:
    """Bytes of the distinct nodes' weights (input and output rows) that one inference of x
    reads: for a tree that does not fit in cache, about what the batch fetches from DRAM."""
    _, _, _, visited, _ = layer._forward(x, save_path=True)
    distinct = np.unique(visited).size
    return distinct * (layer.input_width + layer.output_width) * layer.dtype.itemsize


def make_fff(
    in_w, leaf_w, out_w, depth, batch, *, activation="relu", dtype=np.float32, device="cpu"
):
    """Router-leaf FFF hard inference against the dense FF of width 2**depth * leaf_width."""
    from .layers import FFF

    def make(storage=dtype):
        rng = np.random.default_rng(0)
        layer = FFF(in_w, leaf_w, out_w, depth, activation, dtype=dtype, seed=0)
        width = layer.training_width
        x = rng.standard_normal((batch, in_w)).astype(dtype)
        w1, b1, w2 = _dense_ff(rng, in_w, width, out_w, dtype)
        if device == "cuda":
            full = None
            if np.dtype(storage) != np.dtype(dtype):
                full, layer = layer, layer.astype(storage)
            return _make_cuda_pair(layer, x, (w1, b1, w2), activation, False, full)
        torch_fff = _fastff_torch_fff(layer, x)  # float32, as a PyTorch model holds it
        float32_peer = {}
        if np.dtype(storage) != np.dtype(dtype):
            float32_peer = {FLOAT32_PEER: lambda layer=layer: layer(x)}
            layer = layer.astype(storage)  # the float32 layer's weights, rounded

        def fff():
            layer(x)

        def dense():
            _dense_forward(x, w1, b1, w2, activation)

        peers = {
            "torch": _torch_dense(x, w1, b1, w2, activation),
            "fastfeedforward": _package_fff(in_w, leaf_w, out_w, depth, x, activation),
            "fastff.torch": torch_fff,
            **float32_peer,
        }
        info = {"dense_width": width, "neurons_per_row": leaf_w + depth}
        return dense, fff, batch, info, peers

    return make


def _make_cuda_pair(layer, x, dense_weights, activation, train, float32_layer=None):
    """The case on the GPU; its one peer is the float32 layer a half layer was rounded from."""
    from .gpu.bench import cuda_pair

    dense, fff, rows, info, float32_fn = cuda_pair(
        layer, x, dense_weights, activation, train, float32_layer
    )
    return dense, fff, rows, info, {} if float32_fn is None else {FLOAT32_PEER: float32_fn}


CONFIGS: dict[str, list[Case]] = {
    "ufb": [Case("ufb", "neuron tree", make_ultra(768, 768, 11, 4096))],
    "ufb-b1": [Case("ufb-b1", "neuron tree", make_ultra(768, 768, 11, 1))],
    "ufb-train": [
        Case("ufb-train", "neuron tree fwd+bwd", make_ultra(768, 768, 11, 4096, train=True))
    ],
    "paper-mnist": [Case("paper-mnist", "router-leaf", make_fff(784, 8, 10, 8, 1024))],
    "scaling": [
        Case(f"scaling-d{d}", "neuron tree", make_ultra(768, 768, d, 4096), {"depth": d})
        for d in (6, 8, 10, 12, 14, 16, 18, 20)
    ],
}
GPU_CONFIGS: dict[str, list[Case]] = {
    "gpu-ufb": [
        Case("gpu-ufb", "neuron tree", make_ultra(768, 768, 11, 8192, device="cuda")),
        Case(
            "gpu-ufb-train",
            "neuron tree fwd+bwd",
            make_ultra(768, 768, 11, 8192, train=True, device="cuda"),
        ),
    ],
    "gpu-paper-mnist": [
        Case("gpu-paper-mnist", "router-leaf", make_fff(784, 8, 10, 8, 1024, device="cuda"))
    ],
    # issue 24's large router-leaf case: dense width 2**12 * 16 = 65,536
    "gpu-fff-large": [
        Case("gpu-fff-large", "router-leaf", make_fff(784, 16, 10, 12, 65536, device="cuda"))
    ],
}
DEFAULT_GPU = list(GPU_CONFIGS)
DEFAULT_CPU = ["ufb", "ufb-b1", "ufb-train", "paper-mnist"]


def _limit_threads(threads: int):
    """Pin OpenMP (fastff) and BLAS (dense baseline) to the same thread count."""
    from . import set_num_threads

    set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(
            "note: threadpoolctl is not installed; BLAS threads follow OPENBLAS_NUM_THREADS / "
            "OMP_NUM_THREADS (pip install fastff[bench])"
        )
        return None
    return threadpool_limits(limits=threads)


def run(
    config_names: list[str],
    *,
    threads: int,
    repeat: int,
    device: str = "cpu",
    json_path: str | None = None,
    out=print,
    dtype: str = "float32",
) -> list[dict]:
    table = GPU_CONFIGS if device == "cuda" else CONFIGS
    unknown = [c for c in config_names if c not in table]
    if unknown:
        raise SystemExit(
            f"unknown config(s) {unknown} for device {device!r}; choose from {sorted(table)}"
        )
    from ._validation import check_float_dtype

    storage = check_float_dtype(dtype, "--dtype", half=True)
    limiter = _limit_threads(threads) if device == "cpu" else None
    peer_names = installed_peers() if device == "cpu" else []
    if storage != np.float32:  # the same configs' float32 layers, timed in the same run
        peer_names.append(FLOAT32_PEER)
    if "torch" in peer_names:
        import torch

        torch_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, {threads} threads"
    )
    if device == "cuda":
        from .gpu.bench import device_name

        machine = device_name()
    out(
        f"fastff bench on {machine} (median of {repeat}, dense = NumPy/BLAS"
        f"{' via cuBLAS' if device == 'cuda' else ''}, fastff weights {storage.name})"
    )
    for name in peer_names:  # peer columns: that peer's time, and how much faster fastff is
        out(f"  {name} ms: {PEERS[name]}")
    header = (
        f"{'config':<16}{'kind':<22}{'dense ms':>12}{'fastff ms':>12}{'speedup':>10}"
        f"{'rows/s':>12}{'ns/node':>10}{'MB read':>10}{'GB/s':>8}"
        + "".join(f"{name + ' ms':>20}" for name in peer_names)
    )
    out(header)
    results = []
    for name in config_names:
        for case in table[name]:
            try:
                dense, fff, rows, info, peer_fns = case.make(storage=storage)
            except (MemoryError, ValueError) as exc:  # depth 20: 12.9 GB; no such dtype path
                out(f"{case.name:<16}skipped: {exc}")
                continue
            timer: Callable = median_min_max
            if device == "cuda":
                from .gpu.bench import time_events as timer
            f_med, f_min, f_max = timer(fff, repeat)
            d_med = d_min = d_max = ratio = None
            dense_text, ratio_text = f"{'n/a':>12}", f"{'n/a':>10}"
            if dense is not None:
                d_med, d_min, d_max = timer(dense, repeat)
                ratio = d_med / f_med
                dense_text, ratio_text = f"{d_med * 1e3:>12.3f}", f"{ratio:>9.1f}x"
            # time per row and per visited node (neuron or router/leaf unit on the path)
            ns_per_node = f_med / max(rows, 1) / info["neurons_per_row"] * 1e9
            # distinct weights read per batch, and at what rate (UltraFFF inference only)
            read_mb = info.get("weights_read_mb")
            read_gb_per_s = read_mb / 1e3 / f_med if read_mb is not None else None
            read_text = (
                f"{read_mb:>10.1f}{read_gb_per_s:>8.1f}" if read_mb is not None else f"{'':>18}"
            )
            peers, peer_text = {}, ""
            for name in peer_names:
                fn = peer_fns.get(name)
                if fn is None:  # the peer has no counterpart of this config
                    peer_text += f"{'-':>20}"
                    continue
                p_med, p_min, p_max = timer(fn, repeat)
                peers[name] = {
                    "s": p_med,
                    "min_s": p_min,
                    "max_s": p_max,
                    "fastff_speedup": p_med / f_med,
                }
                peer_text += f"{f'{p_med * 1e3:.3f} ({p_med / f_med:.1f}x)':>20}"
            out(
                f"{case.name:<16}{case.kind:<22}{dense_text}{f_med * 1e3:>12.3f}{ratio_text}"
                f"{rows / f_med:>12.3g}{ns_per_node:>10.1f}{read_text}{peer_text}"
            )
            if "fastfeedforward" in peers and "fastff.torch" in peers:  # PyTorch vs PyTorch
                ratio_torch = peers["fastfeedforward"]["s"] / peers["fastff.torch"]["s"]
                peers["fastff.torch"]["fastfeedforward_speedup"] = ratio_torch
                out(f"{'':<16}fastff.torch.FFF is {ratio_torch:.1f}x fastfeedforward.FFF")
            results.append(
                {
                    "config": case.name,
                    "kind": case.kind,
                    "device": device,
                    "threads": threads,
                    "dtype": storage.name,
                    "dense_s": d_med,
                    "dense_min_s": d_min,
                    "dense_max_s": d_max,
                    "fastff_s": f_med,
                    "fastff_min_s": f_min,
                    "fastff_max_s": f_max,
                    "speedup": ratio,
                    "rows_per_s": rows / f_med,
                    "rows": rows,
                    "ns_per_row": f_med / max(rows, 1) * 1e9,
                    "ns_per_node": ns_per_node,
                    "weights_read_gb_per_s": read_gb_per_s,
                    "peers": peers,
                    **case.params,
                    **info,
                }
            )
            del dense, fff, peer_fns  # a depth-20 tree holds 12.9 GB: free it before the next
    if limiter is not None:
        limiter.restore_original_limits()
    if "torch" in peer_names:
        torch.set_num_threads(torch_threads)
    if json_path:
        _write_json(json_path, results, repeat, machine, out)
    return results


def _write_json(path, results, repeat, machine=None, out=print):
    if machine is None:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"machine": machine, "repeat": repeat, "results": results}, f, indent=2)
    out(f"wrote {path}")


def plot(results: list[dict], path: str) -> None:
    """Speedup and fastff time against depth for the results that carry a depth (`scaling`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("--plot needs matplotlib: pip install fastff[plot]") from exc
    with_depth = [r for r in results if "depth" in r]
    if not with_depth:
        raise SystemExit("--plot draws the `scaling` configuration; include it in the run")
    fig, (ax_time, ax_speed) = plt.subplots(1, 2, figsize=(10, 4))
    dtypes = sorted({r.get("dtype", "float32") for r in with_depth}, key=lambda d: d != "float32")
    for dtype in dtypes:  # one line per weight storage type, float32 first
        series = sorted(
            (r for r in with_depth if r.get("dtype", "float32") == dtype), key=lambda r: r["depth"]
        )
        depths = [r["depth"] for r in series]
        label = f"fastff UltraFFF, {dtype} weights"
        ax_time.plot(depths, [r["fastff_s"] * 1e3 for r in series], "o-", label=label)
        speed = [(r["depth"], r["speedup"]) for r in series if r["speedup"]]
        ax_speed.plot([d for d, _ in speed], [v for _, v in speed], "o-", label=label)
    by_depth: dict = {}  # the dense FF is timed in every pass: one point per depth
    for r in with_depth:
        if r["dense_s"]:
            by_depth.setdefault(r["depth"], []).append(r["dense_s"] * 1e3)
    dense = [(d, float(np.median(ts))) for d, ts in sorted(by_depth.items())]
    ax_time.plot([d for d, _ in dense], [t for _, t in dense], "s--", label="dense FF (BLAS)")
    ax_time.set(
        yscale="log",
        xlabel="depth",
        ylabel="ms per batch of 4096",
        title="time vs depth (768->768; inputs float32)",
    )
    ax_time.legend()
    ax_speed.set(
        yscale="log",
        xlabel="depth",
        ylabel="speedup over float32 dense FF",
        title="speedup vs depth",
    )
    ax_speed.legend()
    for ax in (ax_time, ax_speed):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"fastff, {with_depth[0]['threads']} threads")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "configs",
        nargs="*",
        help=f"configurations to run (default: {' '.join(DEFAULT_CPU)}; cuda: "
        f"{' '.join(DEFAULT_GPU)}); "
        "`pipeline` runs pipe-fff-soft pipe-mlp pipe-ufb-loaded pipe-threads, each with 1 "
        "thread and with --threads in fresh processes",
    )
    parser.add_argument("--threads", type=int, default=2, help="OpenMP and BLAS threads (2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed repetitions (>= 5)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=["float32", "bfloat16", "float16"],
        default=["float32"],
        help="fastff's weight storage, one or several (each a pass over the configs; the "
        "float32 layer's weights rounded); inputs and the dense baseline stay float32",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        default=None,
        help="write results as JSON (e.g. results/bench.json)",
    )
    parser.add_argument(
        "--plot",
        dest="plot_path",
        default=None,
        help="draw speedup and time vs depth of the `scaling` run (PNG)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="under `mpiexec -n R`: data- and tree-parallel training and inference steps over "
        "MPI, and the bytes each collective moved (fastff.bench_distributed; needs mpi4py)",
    )


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first bad argument, found before any timing; None if all are good."""
    from ._validation import max_threads, output_file_problem

    if args.repeat < 1 or args.threads < 1:
        return "--repeat and --threads must be >= 1"
    if args.threads > max_threads():
        return f"--threads must be <= {max_threads()} (8 per CPU, at least 64), got {args.threads}"
    from .bench_pipeline import PIPELINE

    table = GPU_CONFIGS if args.device == "cuda" else CONFIGS
    known = set(table) if args.device == "cuda" else set(table) | set(PIPELINE) | {"pipeline"}
    if args.device == "cuda" and set(args.configs or ()) & (set(PIPELINE) | {"pipeline"}):
        return "the pipeline cases are CPU cases; run them without --device cuda"
    unknown = sorted(set(args.configs or ()) - known)
    if unknown:
        return (
            f"unknown config(s) {unknown} for device {args.device!r}; choose from {sorted(table)}"
        )
    if args.device == "cuda":
        from .backends import get_ops

        try:
            get_ops("cuda")
        except Exception as exc:  # noqa: BLE001 - any failure to reach CUDA is the message
            return f"--device cuda: {exc}"
    for path, flag in ((args.json_path, "--json"), (args.plot_path, "--plot")):
        problem = output_file_problem(path, flag) if path else None
        if problem:
            return problem
    return None


def _split_pipeline(names: list[str]) -> tuple[list[str], list[str]]:
    """(ordinary configs, pipeline cases) of the names given; "pipeline" is the whole group."""
    from .bench_pipeline import PIPELINE

    names = [c for name in names for c in (PIPELINE if name == "pipeline" else [name])]
    return [c for c in names if c not in PIPELINE], [c for c in names if c in PIPELINE]


def main(args: argparse.Namespace) -> int:
    problem = _usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if getattr(args, "distributed", False):
        return _distributed(args)
    from . import bench_pipeline

    configs = args.configs or (DEFAULT_GPU if args.device == "cuda" else DEFAULT_CPU)
    configs, pipeline = _split_pipeline(configs)
    try:
        results = []
        for dtype in args.dtype if configs else ():
            results += run(
                configs,
                threads=args.threads,
                repeat=args.repeat,
                device=args.device,
                json_path=None,
                dtype=dtype,
            )
        if pipeline:
            results += bench_pipeline.run(pipeline, threads=args.threads, repeat=args.repeat)
        if args.json_path:
            _write_json(args.json_path, results, args.repeat)
        if args.plot_path:
            plot(results, args.plot_path)
            print(f"wrote {args.plot_path}")
    except OSError as exc:  # e.g. the disk filled up while writing the results
        print(f"error: cannot write the results: {exc}", file=sys.stderr)
        return 2
    return 0


def _distributed(args: argparse.Namespace) -> int:
    if args.configs or args.device != "cpu" or args.plot_path:
        print("error: --distributed takes no configs, --device or --plot", file=sys.stderr)
        return 2
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print('error: --distributed needs mpi4py: pip install "fastff[mpi]"', file=sys.stderr)
        return 2
    from . import bench_distributed

    bench_distributed.run(threads=args.threads, repeat=args.repeat, json_path=args.json_path)
    return 0
