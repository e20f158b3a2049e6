"""fastff.dask.predict: lazy row-block inference equal to layer(x) bitwise, on the local
scheduler and on a distributed.LocalCluster of 2 worker processes (run in a subprocess with a
timeout, so a stuck cluster fails the test instead of hanging the suite)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastff
from fastff import nn

da = pytest.importorskip("dask.array")
fd = pytest.importorskip("fastff.dask")


def layers(dtype):
    return [
        fastff.UltraFFF(24, 10, 4, parallel_size=2, dtype=dtype, seed=0),
        fastff.FFF(24, 6, 10, 3, dtype=dtype, seed=1),
        nn.Sequential(
            fastff.FFF(24, 4, 12, 2, dtype=dtype, seed=2), nn.Linear(12, 5, dtype=dtype, seed=3)
        ),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float64, "bfloat16", np.float16])
def test_predict_equals_layer_local_scheduler(dtype):
    """Half-precision layers (inference only) compute and return float32: so must the graph."""
    if dtype == "bfloat16":
        pytest.importorskip("ml_dtypes")
    x = np.random.default_rng(0).standard_normal((157, 3, 24))
    dx = da.from_array(x, chunks=(40, 2, 7))  # last axis split: predict rechunks it
    for layer in layers(dtype):
        y = fd.predict(layer, dx)
        expected = layer(x)
        assert y.shape == expected.shape and y.dtype == expected.dtype
        assert y.chunks[:-1] == dx.chunks[:-1]
        got = y.compute(scheduler="threads")
        assert np.array_equal(got, expected)
        got = fd.predict(layer, dx, n_threads=2).compute(scheduler="sync")
        assert np.array_equal(got, expected)


def test_predict_bad_input():
    layer = fastff.UltraFFF(8, 4, 2, seed=0)
    with pytest.raises(TypeError, match="dask.array"):
        fd.predict(layer, np.zeros((3, 8)))
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        fd.predict(layer, da.zeros((3, 9)))
    with pytest.raises(TypeError, match="real numbers"):
        fd.predict(layer, da.zeros((3, 8), dtype=bool))
    with pytest.raises(TypeError, match="Module"):
        fd.predict(object(), da.zeros((3, 8)))
    with pytest.raises(ValueError, match="n_threads"):
        fd.predict(layer, da.zeros((3, 8)), n_threads=0)


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import numpy as np
    import dask.array as da
    from distributed import Client, LocalCluster

    import fastff
    import fastff.dask


    def worker_threads():
        return fastff._threads.effective_n_threads()


    if __name__ == "__main__":
        with LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster, Client(cluster) as client:
            # each worker's fastff threads follow its threads per worker (OMP_NUM_THREADS=1)
            assert set(client.run(worker_threads).values()) == {1}, client.run(worker_threads)
            x = np.random.default_rng(0).standard_normal((4000, 32))
            dx = da.from_array(x, chunks=(500, 32))
            for dtype in (np.float32, np.float64):
                for layer in (
                    fastff.UltraFFF(32, 16, 6, dtype=dtype, seed=0),
                    fastff.FFF(32, 8, 16, 4, dtype=dtype, seed=1),
                ):
                    y = fastff.dask.predict(layer, dx)
                    got = client.compute(y).result()
                    assert np.array_equal(got, layer(x)), type(layer).__name__
        print("CLUSTER OK")
    """
)


def test_predict_on_local_cluster(tmp_path):
    pytest.importorskip("distributed")
    script = tmp_path / "cluster.py"
    script.write_text(CLUSTER_SCRIPT)
    try:
        out = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=180,
            cwd=tmp_path,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"LocalCluster run timed out after {e.timeout} s")
    assert out.returncode == 0 and "CLUSTER OK" in out.stdout, out.stdout + out.stderr
