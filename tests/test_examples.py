"""The examples run (short --quick versions) and do what they claim."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name, *args, timeout=120):
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


def test_train_ultra_mlp_drives_loss_down(tmp_path):
    out = tmp_path / "result.json"
    proc = run_example("train_ultra_mlp.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    losses = result["losses"]
    assert len(losses) == len(
        [line for line in proc.stdout.splitlines() if line.startswith("epoch")]
    )
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["test_accuracy"] > 0.8  # 3 classes: chance is 1/3


def test_jax_train_drives_loss_down(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "result.json"
    run_example("jax_train.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["losses"][-1] < 0.5 * result["losses"][0], result["losses"]
    assert result["test_accuracy"] > 0.8  # 3 classes: chance is 1/3


def _mpiexec():
    pytest.importorskip("mpi4py")
    from test_distributed import MPIEXEC

    if MPIEXEC is None:
        pytest.skip("mpiexec not found")
    return MPIEXEC


def run_mpi_example(name, *args, n=2, timeout=180):
    """The example under `mpiexec -n n python -m mpi4py` (an error on one rank aborts all)."""
    return subprocess.run(
        [_mpiexec(), "-n", str(n), sys.executable, "-m", "mpi4py", str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(EXAMPLES.parent)),
    )


def test_mpi_data_parallel_fashion_mnist(tmp_path):
    out = tmp_path / "result.json"
    proc = run_mpi_example("mpi_train_fashion_mnist.py", "--quick", "--json", str(out))
    if "skipped" in proc.stdout:
        pytest.skip(proc.stdout.strip())
    result = json.loads(out.read_text())
    assert result["ranks"] == 2 and result["same"]  # identical weights on both ranks
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0] and result["test_accuracy"] > 0.6  # 10 classes


def test_mpi_shard_tree_is_bitwise_the_whole_tree(tmp_path):
    out = tmp_path / "result.json"
    run_mpi_example("mpi_shard_tree.py", "--quick", "--json", str(out))
    result = json.loads(out.read_text())
    assert result["bitwise_equal_to_whole"] is True
    assert [r["rows"] for r in result["per_rank"]] == [256, 256]
    assert result["train_losses"][-1] < result["train_losses"][0]


def test_dask_scores_a_memory_mapped_npy(tmp_path):
    pytest.importorskip("distributed")
    out = tmp_path / "result.json"
    run_example("dask_score_npy.py", "--quick", "--json", str(out), timeout=180)
    result = json.loads(out.read_text())
    assert result["rows"] == 20_000 and result["bitwise_equal"] is True
