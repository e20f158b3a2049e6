"""fastff.distributed: broadcast_parameters and allreduce_grads on real MPI ranks.

Each test starts ``mpiexec -n R python script.py`` in a subprocess with a timeout (a hung
collective fails the test instead of hanging the suite) and is skipped when mpi4py or mpiexec
is missing (``pip install "fastff[mpi]"`` brings both). The data-parallel check needs no
separate 1-process run: every rank also trains the whole batch alone, which is the 1-process
training, and compares.
"""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastff

mpi4py = pytest.importorskip("mpi4py")
fd = pytest.importorskip("fastff.distributed")


def _mpiexec():
    here = Path(sys.executable).parent / "mpiexec"  # the mpich wheel's, next to this python
    return str(here) if here.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpiexec = pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found")
REPO = Path(__file__).resolve().parents[1]


def run_mpi(tmp_path, body, n=2, timeout=120):
    script = tmp_path / "script.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    try:
        out = subprocess.run(
            # -m mpi4py: an uncaught exception on one rank aborts them all (MPI_Abort) at
            # once, rather than leaving the others waiting in a collective until the timeout
            [MPIEXEC, "-n", str(n), sys.executable, "-m", "mpi4py", str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp_path,
            env=env,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} timed out after {e.timeout} s")
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


PRELUDE = textwrap.dedent(
    """
    import hashlib
    import numpy as np
    from mpi4py import MPI
    import fastff
    import fastff.distributed as fd
    from fastff.optim import SGD, AdamW

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    """
)


@needs_mpiexec
def test_broadcast_parameters(tmp_path):
    out = run_mpi(
        tmp_path,
        """
        for make in (
            lambda s: fastff.UltraFFF(12, 5, 3, parallel_size=2, seed=s),
            lambda s: fastff.FFF(12, 4, 5, 3, dtype=np.float64, seed=s),
            lambda s: fastff.nn.Sequential(fastff.FFF(12, 4, 6, 2, seed=s),
                                           fastff.nn.Linear(6, 3, seed=s + 7)),
        ):
            layer = make(rank + 1)  # different weights on every rank
            fd.broadcast_parameters(layer, comm)
            expected = make(1).state_dict()
            got = layer.state_dict()
            assert all(np.array_equal(got[k], expected[k]) for k in expected), rank
            layer = make(rank + 1)
            fd.broadcast_parameters(layer, root=size - 1)  # default comm, another root
            expected = make(size).state_dict()
            assert all(np.array_equal(layer.state_dict()[k], v) for k, v in expected.items())
        # mismatched configs: the same clear error on every rank, no hang
        layer = fastff.UltraFFF(12, 5, 3 + rank, seed=0)
        for call in (fd.broadcast_parameters, fd.allreduce_grads):
            try:
                call(layer, comm)
            except ValueError as e:
                assert "differ" in str(e), e
            else:
                raise AssertionError("no error on mismatched configs")
        if rank == 0:
            print("BCAST OK")
        """,
    )
    assert "BCAST OK" in out


DATA_PARALLEL = """
KINDS = {
    "ultra": lambda dt: fastff.UltraFFF(16, 6, 4, parallel_size=2, dtype=dt, seed=3),
    "fff-soft": lambda dt: fastff.FFF(16, 4, 6, 3, dtype=dt, seed=4),
    "fff-hard": lambda dt: fastff.FFF(16, 4, 6, 3, train_hardened=True, dtype=dt, seed=5),
}
N, STEPS = 64, STEPS_
rng = np.random.default_rng(0)
X = rng.standard_normal((STEPS, N, 16))
T = rng.standard_normal((STEPS, N, 6))


def train(kind, dtype, opt_kind, x_rows, comm_or_none):
    layer = KINDS[kind](dtype)
    if comm_or_none is not None:
        layer.load_state_dict(KINDS[kind](dtype).state_dict())
        # scramble, then align from rank 0: exercises the broadcast on the way
        for p in layer.params.values():
            p += rank
        fd.broadcast_parameters(layer, comm_or_none)
    opt = SGD(layer, lr=0.05, momentum=0.9) if opt_kind == "sgd" else AdamW(layer, lr=1e-2)
    for s in range(STEPS):
        x, t = X[s][x_rows], T[s][x_rows]
        kw = {"hardening": 0.05} if kind.startswith("fff") else {}
        y, backprop = layer.forward_train(x.astype(dtype), **kw)
        layer.zero_grad()
        backprop((y - t.astype(dtype)) / len(x))  # gradient of the mean of 0.5 * |y - t|^2
        if comm_or_none is not None:
            fd.allreduce_grads(layer, comm_or_none, op="mean")
        opt.step()
    return layer.state_dict()


half = N // size
mine = slice(rank * half, (rank + 1) * half)
digest = hashlib.sha256()
for kind in KINDS:
    for dtype in (np.float64, np.float32):
        for opt_kind in ("sgd", "adamw"):
            alone = train(kind, dtype, opt_kind, slice(None), None)
            dp = train(kind, dtype, opt_kind, mine, comm)
            diff = max(float(np.max(np.abs(alone[k] - dp[k]))) for k in alone)
            tol = 1e-12 if dtype == np.float64 else 1e-6
            assert diff <= tol, (kind, dtype, opt_kind, diff)
            if rank == 0:
                print(f"{kind} {np.dtype(dtype).name} {opt_kind} max|diff| {diff:.3g}")
            for k in sorted(dp):
                digest.update(dp[k].tobytes())
# every rank ends with the same weights
assert len(set(comm.allgather(digest.hexdigest()))) == 1
if rank == 0:
    print("DIGEST", digest.hexdigest())
    print("DP OK")
"""


@needs_mpiexec
def test_data_parallel_equals_full_batch(tmp_path):
    body = DATA_PARALLEL.replace("STEPS_", "20")
    first = run_mpi(tmp_path, body)
    assert "DP OK" in first
    print(first)
    # deterministic: a second 2-rank run ends bitwise where the first did
    second = run_mpi(tmp_path, body)
    digest = [line for line in first.splitlines() if line.startswith("DIGEST")]
    assert digest and digest == [ln for ln in second.splitlines() if ln.startswith("DIGEST")]


@needs_mpiexec
def test_sum_and_single_rank(tmp_path):
    out = run_mpi(
        tmp_path,
        """
        layer = fastff.UltraFFF(8, 3, 2, seed=0)
        for g in layer.grads.values():
            g[...] = rank + 1
        fd.allreduce_grads(layer, comm, op="sum")
        assert all(np.all(g == sum(range(1, size + 1))) for g in layer.grads.values())
        # a communicator of size 1: defined (a no-op), on each rank alone
        alone = comm.Split(rank, 0)
        for g in layer.grads.values():
            g[...] = 3.0
        fd.allreduce_grads(layer, alone)
        fd.broadcast_parameters(layer, alone)
        assert all(np.all(g == 3.0) for g in layer.grads.values())
        for g in layer.grads.values():
            g[...] = 0.5 * (rank + 1)
        fd.allreduce_grads(layer, comm)
        assert all(np.all(g == 0.75) for g in layer.grads.values()), layer.grads
        if rank == 0:
            print("SUM OK")
        """,
    )
    assert "SUM OK" in out


def test_bad_arguments():
    layer = fastff.UltraFFF(8, 3, 2, seed=0)
    with pytest.raises(ValueError, match="op"):
        fd.allreduce_grads(layer, op="max")
    with pytest.raises(TypeError, match="Module"):
        fd.allreduce_grads(object())
    with pytest.raises(TypeError, match="mpi4py communicator"):
        fd.shard(layer, comm=object())
