"""benchmarks/sweep.py end to end on small synthetic Fashion-MNIST files: runs, resumes, writes
the table, the JSON and (with matplotlib) the figure."""

import importlib.util
import json
from pathlib import Path

import pytest

from conftest import write_fashion_mnist

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configurations_cover_the_issue(sweep):
    configs = {c["name"]: c for c in sweep.configurations((0.05, 0.5))}
    assert "ff-512" in configs
    for depth, leaf in [(3, 64), (4, 32), (5, 16), (6, 8)]:
        for suffix in ("", "-bal0.05", "-bal0.5", "-master", "-bal0.05-master", "-bal0.5-master"):
            assert f"fff-d{depth}x{leaf}{suffix}" in configs
    assert len(configs) == 1 + 3 + 4 * 6 + 7 * 3
    assert list(configs)[:4] == ["ff-512", "ff-16", "ff-32", "ff-64"]
    assert configs["fff-d5x16-bal0.5-master"]["args"][-3:] == [
        "--load-balancing",
        "0.5",
        "--master-leaf",
    ]
    shapes = ["d8x1", "d7x2", "d6x4", "d5x8", "d8x3", "d6x8", "d5x16"]
    assert [n for n in configs if n.startswith("ultra")] == [
        f"ultra-{shape}{suffix}" for shape in shapes for suffix in ("", "-bal0.05", "-bal0.5")
    ]
    assert configs["ultra-d6x4-bal0.5"]["args"][-2:] == ["--load-balancing", "0.5"]
    assert configs["ultra-d6x4-bal0.5"]["family"] == "ultra+bal0.5"


def test_sweep_runs_resumes_and_writes_the_table(sweep, tmp_path, capsys):
    data = tmp_path / "data"
    write_fashion_mnist(data, n_train=300, n_test=80, gz=True)
    out, work = tmp_path / "docs" / "table", tmp_path / "work"
    args = ["--only", "ff-512", "fff-d3x64-bal0.5-master", "--seeds", "2", "--epochs", "1"]
    args += ["--val-size", "40", "--data", str(data), "--out", str(out), "--work", str(work)]
    args += ["--time-repeats", "2", "--jobs", "2", "--balancing", "0.5"]
    assert sweep.main(args) == 0
    printed = capsys.readouterr().out
    assert "4 runs to do, 0 already done" in printed
    results = json.loads(out.with_suffix(".json").read_text())
    assert sorted(results["runs"]) == [
        "ff-512/seed0",
        "ff-512/seed1",
        "fff-d3x64-bal0.5-master/seed0",
        "fff-d3x64-bal0.5-master/seed1",
    ]
    run = results["runs"]["fff-d3x64-bal0.5-master/seed1"]
    assert run["neurons_per_inference"] == 3 + 2 * 64 and run["training_width"] == 9 * 64
    assert len(run["final_routing"]["leaf_counts"]) == 8 and "routing_entropy" in run["history"][0]
    assert set(results["timing"]) == {"ff-512", "fff-d3x64-bal0.5-master"}
    rows = {row["config"]: row for row in results["table"]}
    assert rows["ff-512"]["speedup"] == pytest.approx(1.0) and rows["ff-512"]["of_ff"] == 1.0
    assert rows["fff-d3x64-bal0.5-master"]["speedup"] > 0 and rows["ff-512"]["seeds"] == 2
    table = out.with_suffix(".md").read_text()
    assert (
        "| fff-d3x64-bal0.5-master | 131 | 576 |" in table and "(n=2)" in table and " ± " in table
    )
    if importlib.util.find_spec("matplotlib"):
        assert out.with_suffix(".png").stat().st_size > 0
    # resumed: nothing to train again; another balancing weight reruns only the balanced runs
    assert sweep.main(args) == 0
    assert "0 runs to do, 4 already done" in capsys.readouterr().out
    assert sweep.main([*args, "--epochs", "2", "--skip-timing", "--seeds", "1"]) == 0
    assert "2 runs to do, 0 already done" in capsys.readouterr().out  # another command line
    results = json.loads(out.with_suffix(".json").read_text())
    command = results["runs"]["fff-d3x64-bal0.5-master/seed0"]["command"]
    assert command[command.index("--epochs") + 1] == "2" and len(results["runs"]) == 4


def test_failed_runs_are_reported_and_retried(sweep, tmp_path, capsys):
    out = tmp_path / "table"
    args = ["--only", "ff-512", "--seeds", "1", "--data", str(tmp_path / "missing")]
    args += ["--out", str(out), "--work", str(tmp_path / "work"), "--skip-timing"]
    assert sweep.main(args) == 1
    captured = capsys.readouterr()
    assert "FAILED" in captured.out and "ff-512/seed0" in captured.err
    assert "error" in json.loads(out.with_suffix(".json").read_text())["runs"]["ff-512/seed0"]
    assert sweep.main(args) == 1  # a failed run is tried again
    assert "1 runs to do" in capsys.readouterr().out
