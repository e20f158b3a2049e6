"""The examples run (short --quick versions) and do what they claim."""

import json
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
