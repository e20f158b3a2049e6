"""fastff/gpu/kernels.cu's inference kernels, run on the host (tests/cuda_emulator.h: a thread
per lane, every shuffle handed over through a barrier), against the CPU kernels. The CUDA
source's logic is checked on every machine, CI included; tests/test_gpu.py runs the same
kernels on a GPU where there is one. Also: the whole source compiles for Hopper (sm_90) with
nvcc, where nvcc is installed, without register spills."""

import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastff import _cmm
from fastff import reference as R
from fastff.gpu import kernels

from conftest import assert_close, dyadic

ml_dtypes = pytest.importorskip("ml_dtypes")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {"bfloat16": (1, np.dtype(ml_dtypes.bfloat16)), "float16": (2, np.dtype(np.float16))}
ACTS = sorted(_cmm.ACTIVATIONS)
# any widths (the general kernels), and multiples of 8 up to 1024 (the 16-bit register path)
WIDTHS = st.integers(1, 70) | st.sampled_from([8, 64, 256, 264, 512, 768, 1024])


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CUDA host emulator")
    exe = str(tmp_path_factory.mktemp("emulator") / "cuda_emulator")
    source = os.path.join(ROOT, "tests", "cuda_emulator.cpp")
    command = [compiler, "-std=c++17", "-O1", "-pthread", "-I", os.path.join(ROOT, "fastff")]
    # AddressSanitizer where the compiler has it: the driver allocates every array at its
    # exact size, so a read or write past a row or array fails the run instead of passing
    # unnoticed when the stray value happens not to change the result
    asan = ["-fsanitize=address", "-fno-omit-frame-pointer"]
    built = subprocess.run([*command, *asan, source, "-o", exe], capture_output=True, timeout=300)
    if built.returncode != 0:
        subprocess.run([*command, source, "-o", exe], check=True, timeout=300)
    return exe


def _run(exe, folder, args, arrays):
    for name, a in arrays.items():
        np.ascontiguousarray(a).tofile(os.path.join(folder, f"{name}.bin"))
    subprocess.run([exe, *map(str, args)], check=True, timeout=120)


def _emulated_ultra(exe, folder, kernel, k, kind, x, w_in, b_in, w_out_t, depth, trees, act):
    n, in_w = x.shape
    out_w = w_out_t.shape[1]
    args = ["ultra", folder, kernel, k, kind, n, in_w, out_w, depth, trees]
    _run(
        exe,
        folder,
        [*args, _cmm.ACTIVATIONS[act], 1],
        dict(x=x, w_in=w_in, b_in=b_in, w_out_t=w_out_t),
    )
    path = n * trees * (depth + 1)

    def read(name, dtype, count):
        return np.fromfile(os.path.join(folder, f"{name}.bin"), dtype=dtype, count=count)

    y = read("y", np.float32, n * out_w).reshape(n, out_w)
    visited = read("visited", np.int64, path).reshape(n, -1)
    return y, visited, read("preact", np.float32, path).reshape(n, -1)


def _cpu_ultra(x, w_in, b_in, w_out_t, depth, trees, act, kind=None):
    n = x.shape[0]
    y = np.empty((n, w_out_t.shape[1]), np.float32)
    visited = np.empty((n, trees * (depth + 1)), np.intp)
    preact = np.empty(visited.shape, np.float32)
    args = (x, w_in, b_in, w_out_t, depth, trees, _cmm.ACTIVATIONS[act], y, visited, preact, True)
    if kind is None:
        _cmm.ultra_forward(*args, 1)
    else:
        _cmm.ultra_forward_half(*args, kind, 1)
    return y, visited, preact


# float32 register kernels: widths 4 * in4, 4 * out4 (<= 1024: K <= 8 float4 per lane)
FOURS = st.integers(1, 64) | st.sampled_from([100, 128, 200, 256])
FLOAT32_CASES = dict(
    in4=FOURS,
    out4=FOURS,
    depth=st.integers(0, 5),
    trees=st.integers(1, 2),
    batch=st.integers(1, 20),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)


def test_kernel_half_codes_are_the_cpu_ones():
    assert {n: c for n, (c, _) in KINDS.items()} == _cmm.HALF_KINDS
    assert tuple(sorted(_cmm.HALF_KINDS.values())) == kernels.HALF_KIND_CODES


def _h8_k(in_w, out_w):
    """fastff.gpu.cmm._h8_lanes's choice of K (None: the general kernel)."""
    if in_w % 8 or out_w % 8:
        return None
    return next((k for k in kernels.H8_KS if 256 * k >= max(in_w, out_w)), None)


@settings(max_examples=40, deadline=None)
@given(
    in_w=WIDTHS,
    out_w=WIDTHS,
    depth=st.integers(0, 6),
    trees=st.integers(1, 3),
    batch=st.integers(1, 20),
    kind=st.sampled_from(sorted(KINDS)),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_ultra_kernels_match_the_cpu(
    emulator, tmp_path_factory, in_w, out_w, depth, trees, batch, kind, act, seed
):
    """ultra_forward_half<KIND> (any widths) and ultra_forward_h8<K, KIND> (the chosen K, and
    K = 4, whose extra chunks lie past the row) against fastff._cmm.ultra_forward_half. Dyadic
    values are exact in both formats and their dots exact in float32, so the paths agree bit
    for bit and the outputs differ by the float32 summation order only."""
    code, half = KINDS[kind]
    rng = np.random.default_rng(seed)
    n_nodes = trees * (2 ** (depth + 1) - 1)
    w_in, b_in = dyadic(rng, (n_nodes, in_w)), dyadic(rng, n_nodes)
    w_out_t = dyadic(rng, (n_nodes, out_w))
    bits = [a.astype(half).view(np.uint16) for a in (w_in, b_in, w_out_t)]
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y_cpu, visited_cpu, preact_cpu = _cpu_ultra(x, *bits, depth, trees, act, code)
    folder = str(tmp_path_factory.mktemp("case"))
    k = _h8_k(in_w, out_w)
    runs = [("half", 0)] + ([("h8", k), ("h8", 4)] if k is not None else [])
    for kernel, k in runs:
        y, visited, preact = _emulated_ultra(
            emulator, folder, kernel, k, code, x, *bits, depth, trees, act
        )
        what = f"{kernel}<{k}, {kind}>"
        np.testing.assert_array_equal(visited, visited_cpu, err_msg=what)
        np.testing.assert_array_equal(preact, preact_cpu, err_msg=what)  # exact dots
        assert_close(y, y_cpu, np.float32, trees * (depth + 1) * in_w, what)


@settings(max_examples=25, deadline=None)
@given(
    in_w=st.integers(1, 70),
    leaf_w=st.integers(1, 8) | st.sampled_from([33, 64]),
    out_w=st.integers(1, 70),
    depth=st.integers(0, 5),
    batch=st.integers(1, 24),
    kind=st.sampled_from(sorted(KINDS)),
    act=st.sampled_from(ACTS),
    seed=st.integers(0, 2**32 - 1),
)
def test_half_fff_kernel_matches_the_cpu(
    emulator, tmp_path_factory, in_w, leaf_w, out_w, depth, batch, kind, act, seed
):
    code, half = KINDS[kind]
    rng = np.random.default_rng(seed)
    n_leaves = 2**depth
    shapes = dict(
        node_w=(n_leaves - 1, in_w),
        node_b=(n_leaves - 1,),
        w1t=(n_leaves, leaf_w, in_w),
        b1=(n_leaves, leaf_w),
        w2=(n_leaves, leaf_w, out_w),
        b2=(n_leaves, out_w),
    )
    bits = {k: dyadic(rng, s).astype(half).view(np.uint16) for k, s in shapes.items()}
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y_cpu = np.empty((batch, out_w), np.float32)
    _cmm.fff_infer_half(x, *bits.values(), depth, _cmm.ACTIVATIONS[act], y_cpu, code, 1)
    folder = str(tmp_path_factory.mktemp("fff"))
    args = ["fff", folder, code, batch, in_w, leaf_w, out_w, depth, _cmm.ACTIVATIONS[act]]
    _run(emulator, folder, args, dict(x=x, **bits))
    y = np.fromfile(os.path.join(folder, "y.bin"), np.float32).reshape(batch, out_w)
    assert_close(y, y_cpu, np.float32, in_w + leaf_w, f"fff_infer_half<{kind}>")


@settings(max_examples=20, deadline=None)
@given(**FLOAT32_CASES)
def test_float32_register_kernel_matches_the_cpu(
    emulator, tmp_path_factory, in4, out4, depth, trees, batch, act, seed
):
    """ultra_forward_f4<K>, the float32 path the GPU layers take for widths divisible by 4."""
    in_w, out_w = 4 * in4, 4 * out4
    rng = np.random.default_rng(seed)
    n_nodes = trees * (2 ** (depth + 1) - 1)
    weights = [
        dyadic(rng, s, dtype=np.float32) for s in ((n_nodes, in_w), n_nodes, (n_nodes, out_w))
    ]
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    y_cpu, visited_cpu, preact_cpu = _cpu_ultra(x, *weights, depth, trees, act)
    k = -(-max(in_w, out_w) // 128)
    folder = str(tmp_path_factory.mktemp("f4"))
    y, visited, preact = _emulated_ultra(
        emulator, folder, "f4", k, 0, x, *weights, depth, trees, act
    )
    np.testing.assert_array_equal(visited, visited_cpu)
    np.testing.assert_array_equal(preact, preact_cpu)
    assert_close(y, y_cpu, np.float32, trees * (depth + 1) * in_w, f"ultra_forward_f4<{k}>")


@settings(max_examples=20, deadline=None)
@given(**FLOAT32_CASES)
def test_float32_backward_rows_kernel_matches_the_reference(
    emulator, tmp_path_factory, in4, out4, depth, trees, batch, act, seed
):
    """ultra_backward_rows_f4<K>, the training step's per-row pass: each visit's dz and
    act(z), and dx, from the CPU forward's saved path (the GPU's weight-gradient passes
    sort and reduce these; they use block-shared memory, which the emulator leaves out)."""
    in_w, out_w = 4 * in4, 4 * out4
    rng = np.random.default_rng(seed)
    n_nodes = trees * (2 ** (depth + 1) - 1)
    w_in, b_in = (
        dyadic(rng, (n_nodes, in_w), dtype=np.float32),
        dyadic(rng, n_nodes, dtype=np.float32),
    )
    w_out_t = dyadic(rng, (n_nodes, out_w), dtype=np.float32)
    x = dyadic(rng, (batch, in_w), denom=8, dtype=np.float32)
    dy = dyadic(rng, (batch, out_w), denom=8, dtype=np.float32)
    _, visited, preact = _cpu_ultra(x, w_in, b_in, w_out_t, depth, trees, act)
    k = -(-max(in_w, out_w) // 128)
    folder = str(tmp_path_factory.mktemp("backward"))
    args = ["backward", folder, k, batch, in_w, out_w, visited.shape[1], _cmm.ACTIVATIONS[act]]
    arrays = dict(dy=dy, w_in=w_in, w_out_t=w_out_t, visited=visited.astype(np.int64))
    _run(emulator, folder, args, dict(arrays, preact=preact))

    def read(name, shape):
        return np.fromfile(os.path.join(folder, f"{name}.bin"), np.float32).reshape(shape)

    z = preact.astype(np.float64)
    dz_ref = np.einsum("ro,rvo->rv", dy, w_out_t[visited]) * R.act_grad(act, z)
    dx_ref = np.einsum("rv,rvi->ri", dz_ref, w_in[visited])
    terms = visited.shape[1] * max(in_w, out_w)
    assert_close(read("dz", visited.shape), dz_ref, np.float32, out_w, "dz")
    assert_close(read("a", visited.shape), R.act(act, z), np.float32, 1, "act(z)")
    assert_close(read("dx", (batch, in_w)), dx_ref, np.float32, terms, "dx")


@pytest.mark.parametrize("kernel", ["half", "h8"])
def test_half_kernels_propagate_nan_to_its_row_only(emulator, tmp_path, kernel):
    rng = np.random.default_rng(0)
    depth, trees, in_w, out_w = 3, 2, 16, 24
    n_nodes = trees * (2 ** (depth + 1) - 1)
    bits = [
        dyadic(rng, s).astype(np.float16).view(np.uint16)
        for s in ((n_nodes, in_w), n_nodes, (n_nodes, out_w))
    ]
    x = dyadic(rng, (9, in_w), denom=8, dtype=np.float32)
    x[4, 3] = np.nan
    y, _, preact = _emulated_ultra(
        emulator, str(tmp_path), kernel, 1, 2, x, *bits, depth, trees, "relu"
    )
    assert np.isnan(y[4]).all() and np.isnan(preact[4]).all()
    assert np.isfinite(np.delete(y, 4, axis=0)).all()


def test_kernels_compile_for_hopper_without_spills(tmp_path):
    """Every instantiation the launchers use (kernels.name_expressions), compiled by nvcc for
    sm_90 as NVRTC compiles them for CuPy: no errors, no warnings, and no register spills (a
    spilled register path would run from local memory)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    source = tmp_path / "kernels.cu"
    instances = ",\n".join(f"(void*)&{n}" for n in kernels.name_expressions())
    source.write_text(kernels.source() + f"\nvoid* fastff_instances[] = {{\n{instances}}};\n")
    command = [nvcc, "-std=c++17", "-arch=sm_90", "-cubin", "-Xptxas", "-v", str(source)]
    done = subprocess.run(
        [*command, "-o", str(tmp_path / "kernels.cubin")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning" not in done.stderr.lower(), done.stderr[-3000:]
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", done.stderr)
    assert len(spills) >= len(kernels.name_expressions())
    assert all(s == ("0", "0") for s in spills), done.stderr


def test_kernels_compile_with_nvrtc_as_cupy_compiles_them():
    """NVRTC, the compiler behind cupy.RawModule, takes the source and every name expression
    for sm_90 (where the nvidia-cuda-nvrtc wheel is installed: no GPU needed)."""
    import ctypes
    import glob

    nvidia = pytest.importorskip("nvidia", reason="the nvidia-cuda-nvrtc wheel is not installed")
    found = [p for d in nvidia.__path__ for p in glob.glob(f"{d}/cu*/lib/libnvrtc.so*")]
    if not found:
        pytest.skip("the nvidia-cuda-nvrtc wheel is not installed")
    nvrtc = ctypes.CDLL(sorted(found)[-1])
    program = ctypes.c_void_p()
    source = kernels.source().encode()
    assert nvrtc.nvrtcCreateProgram(ctypes.byref(program), source, b"k.cu", 0, None, None) == 0
    names = kernels.name_expressions()
    for name in names:
        assert nvrtc.nvrtcAddNameExpression(program, name.encode()) == 0, name
    options = (ctypes.c_char_p * 2)(b"-std=c++17", b"--gpu-architecture=sm_90")
    result = nvrtc.nvrtcCompileProgram(program, 2, options)
    size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    nvrtc.nvrtcGetProgramLog(program, log)
    assert result == 0 and not log.value.strip(), log.value.decode()[-3000:]
    lowered = ctypes.c_char_p()
    for name in names:
        assert nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)) == 0
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
