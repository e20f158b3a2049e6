"""The benchmark command runs and reports what it measured (it never asserts a time)."""

import json

import numpy as np
import pytest

from fastff import UltraFFF, bench


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
