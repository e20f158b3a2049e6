"""The benchmark command runs and reports what it measured (it never asserts a time)."""

import json
import time

import numpy as np
import pytest

from fastff import FFF, UltraFFF, bench, reference


def test_bench_runs_a_small_config_and_writes_json(tmp_path):
    path = tmp_path / "r.json"
    lines = []
    results = bench.run(["ufb-b1"], threads=1, repeat=1, json_path=str(path), out=lines.append)
    assert results[0]["config"] == "ufb-b1" and results[0]["speedup"] > 0
    assert results[0]["neurons_per_row"] == 12 and results[0]["dense_width"] == 4095
    assert json.loads(path.read_text())["results"][0]["fastff_s"] == results[0]["fastff_s"]
    assert any("ufb-b1" in line for line in lines)
    # one row visits depth + 1 = 12 distinct nodes of (768 + 768) float32 weights each
    assert results[0]["weights_read_mb"] == pytest.approx(12 * 1536 * 4 / 1e6)
    assert results[0]["weights_read_gb_per_s"] > 0


def test_distinct_weights_count_each_shared_node_once():
    layer = UltraFFF(8, 5, 3, 2, "gelu", seed=0)
    row = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)
    one = bench._distinct_weight_bytes(layer, row)
    assert one == 2 * 4 * (8 + 5) * 4  # 2 trees x 4 levels, float32
    assert bench._distinct_weight_bytes(layer, np.repeat(row, 3, axis=0)) == one


def test_unknown_config_is_refused():
    with pytest.raises(SystemExit, match="unknown config"):
        bench.run(["nope"], threads=1, repeat=1, out=lambda s: None)


def test_plot_draws_the_scaling_series(tmp_path):
    pytest.importorskip("matplotlib")
    results = [
        {
            "depth": d,
            "fastff_s": 1e-3 * d,
            "dense_s": 1e-2 * 2**d if d < 12 else None,
            "speedup": 10.0 * d if d < 12 else None,
            "threads": 2,
        }
        for d in (6, 8, 10, 12)
    ]
    path = tmp_path / "scaling.png"
    bench.plot(results, str(path))
    assert path.stat().st_size > 1000


def test_peer_columns_only_for_installed_peers(monkeypatch):
    monkeypatch.setattr(bench, "installed_peers", lambda: [])
    lines = []
    results = bench.run(["ufb-b1"], threads=1, repeat=1, out=lines.append)
    assert results[0]["peers"] == {}
    assert not any("torch" in line for line in lines)


def test_torch_peer_runs_the_same_dense_layer():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))
    w1, b1, w2 = bench._dense_ff(rng, 5, 7, 3, np.float64)
    b1 += rng.standard_normal(7)
    for act in ("relu", "gelu", "identity"):
        y = bench._torch_dense(x, w1, b1, w2, act)().numpy()
        np.testing.assert_allclose(y, reference.dense_forward(x, w1, b1, w2, act), 1e-12)
    dx, dw1, db1, dw2 = (t.numpy() for t in bench._torch_dense(x, w1, b1, w2, "relu", dy)())
    z = x @ w1 + b1
    dz = (dy @ w2.T) * (z > 0)
    np.testing.assert_allclose(dw2, np.maximum(z, 0).T @ dy, 1e-12)
    np.testing.assert_allclose(dw1, x.T @ dz, 1e-12)
    np.testing.assert_allclose(db1, dz.sum(axis=0), 1e-12)
    np.testing.assert_allclose(dx, dz @ w1.T, 1e-12)
    assert torch.get_num_threads() >= 1


def test_peers_appear_as_columns_when_installed():
    torch = pytest.importorskip("torch")
    pytest.importorskip("fastfeedforward")
    threads_before = torch.get_num_threads()
    lines = []
    results = bench.run(["paper-mnist"], threads=1, repeat=1, out=lines.append)
    peers, fastff_s = results[0]["peers"], results[0]["fastff_s"]
    assert set(peers) == {"torch", "fastfeedforward", "fastff.torch"}
    for peer in peers.values():
        assert peer["s"] > 0 and peer["fastff_speedup"] == peer["s"] / fastff_s
    ratio = peers["fastfeedforward"]["s"] / peers["fastff.torch"]["s"]
    assert peers["fastff.torch"]["fastfeedforward_speedup"] == ratio
    assert any("torch ms" in line and "fastfeedforward ms" in line for line in lines)
    assert any("fastff.torch ms" in line for line in lines)
    assert torch.get_num_threads() == threads_before  # restored after the run
    y = bench._package_fff(20, 4, 3, 2, np.ones((5, 20), np.float32), "relu")()
    assert tuple(y.shape) == (5, 3)


def test_fastff_torch_peer_is_the_same_layer():
    pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        layer = FFF(20, 4, 3, 2, "gelu", dtype=dtype, seed=0)
        x = np.random.default_rng(0).standard_normal((5, 20)).astype(dtype)
        np.testing.assert_array_equal(bench._fastff_torch_fff(layer, x)().numpy(), layer(x))


@pytest.mark.parametrize("activation", ["relu", "gelu", "identity"])
@pytest.mark.parametrize("threads", [1, 2])
def test_numpy_baseline_is_the_dense_layer(activation, threads):
    """The bench's NumPy baseline (in-place activation over row chunks, on the bench's threads)
    computes reference.dense_forward and its exact gradients."""
    import fastff

    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((300, 5)), rng.standard_normal((300, 3))
    w1, b1, w2 = bench._dense_ff(rng, 5, 400, 3, np.float64)  # 400 wide: several row chunks
    b1 += rng.standard_normal(400)
    before = fastff.get_num_threads()
    fastff.set_num_threads(threads)
    try:
        y = bench._dense_forward(x, w1, b1, w2, activation)
        y2, dx, dw1, db1, dw2 = bench._dense_train_step(x, w1, b1, w2, activation, dy)
    finally:
        fastff.set_num_threads(before)
    want = reference.dense_forward(x, w1, b1, w2, activation)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y2, want, rtol=1e-12, atol=1e-12)
    z = x @ w1 + b1
    dz = (dy @ w2.T) * reference.act_grad(activation, z)
    for got, exact in (
        (dx, dz @ w1.T),
        (dw1, x.T @ dz),
        (db1, dz.sum(0)),
        (dw2, reference.act(activation, z).T @ dy),
    ):
        np.testing.assert_allclose(got, exact, rtol=1e-10, atol=1e-12)


def test_cases_beyond_the_dense_width_time_fastff_alone():
    """Past MAX_DENSE_WIDTH (the deep `scaling` depths) a case has no dense side and no peers,
    but still reports the weights it reads."""
    dense, fff, rows, info, peers = bench.make_ultra(16, 16, 15, 8)()
    assert info["dense_width"] > bench.MAX_DENSE_WIDTH
    assert dense is None and peers == {} and rows == 8
    assert info["weights_read_mb"] > 0
    fff()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--json", "DIR"], "is a directory"),
        (["--json", "/dev/full"], "not a regular file"),
        (["--json", "FILE/x.json"], "is not a folder"),
        (["--plot", "DIR"], "is a directory"),
        (["--threads", "100000"], "--threads must be <="),
        (["nonsense-config"], "unknown config"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_work(args, words, tmp_path, capsys):
    """Issue 18: these ended in tracebacks, an unwritable --json only after every timing."""
    from fastff.__main__ import main

    (tmp_path / "file").write_text("x")
    args = [a.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "file")) for a in args]
    code = main(["bench", *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cuda_without_cupy_is_a_usage_error(capsys, monkeypatch):
    from fastff import backends
    from fastff.__main__ import main

    def no_cuda(device):
        raise RuntimeError("device='cuda' needs CuPy")

    monkeypatch.setattr(backends, "get_ops", no_cuda)
    assert main(["bench", "--device", "cuda"]) == 2
    assert "--device cuda" in capsys.readouterr().err


def test_pipeline_case_runs_with_one_and_all_threads(tmp_path):
    """`bench pipe-fff-soft` times the case in two fresh processes (1 thread, --threads) and
    writes both times and their ratio."""
    import json
    import subprocess
    import sys

    out = tmp_path / "pipe.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastff",
            "bench",
            "pipe-fff-soft",
            "--repeat",
            "1",
            "--threads",
            "2",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["config"] == "pipe-fff-soft" and row["threads"] == 2
    assert row["one_thread_s"] > 0 and row["all_threads_s"] > 0
    assert row["ratio"] == pytest.approx(row["all_threads_s"] / row["one_thread_s"])


def test_pipeline_cases_are_cpu_only(capsys):
    from fastff.__main__ import main

    assert main(["bench", "--device", "cuda", "pipeline"]) == 2
    assert "CPU cases" in capsys.readouterr().err


def test_half_precision_bench_times_the_float32_layer_in_the_same_run():
    from fastff.bench import FLOAT32_PEER, run

    lines = []
    results = run(
        ["ufb-b1", "paper-mnist"], threads=1, repeat=1, dtype="bfloat16", out=lines.append
    )
    assert [r["config"] for r in results] == ["ufb-b1", "paper-mnist"]
    for r in results:
        assert r["dtype"] == "bfloat16" and r["fastff_s"] > 0
        assert r["peers"][FLOAT32_PEER]["s"] > 0
    assert "fastff weights bfloat16" in lines[0]
    assert run(["ufb-train"], threads=1, repeat=1, dtype="bfloat16", out=lines.append) == []
    assert "skipped: bfloat16 layers are for inference" in lines[-1]


def test_short_calls_are_timed_in_back_to_back_groups():
    """A sample of a call shorter than MIN_SAMPLE_S is the mean of several calls; long calls
    are timed one by one."""
    from fastff import _timing

    assert _timing.calls_per_sample(1.0) == 1
    assert _timing.calls_per_sample(_timing.MIN_SAMPLE_S) == 1
    assert _timing.calls_per_sample(_timing.MIN_SAMPLE_S / 10) == 10
    assert _timing.calls_per_sample(0.0) == _timing.MAX_CALLS_PER_SAMPLE
    calls = []
    med, low, high = _timing.median_min_max(lambda: calls.append(1), 5)
    per_sample, rest = divmod(len(calls) - 2, 5)  # after the warm-up and the sizing call
    assert rest == 0 and per_sample > 1
    assert 0 < low <= med <= high
    calls.clear()
    _timing.median_min_max(lambda: calls.append(time.sleep(1.5 * _timing.MIN_SAMPLE_S)), 5)
    assert len(calls) == 2 + 5  # long calls: one per sample
