"""`python -m fastff train` end to end on small synthetic Fashion-MNIST files."""

import json
import sys

import pytest

from fastff.__main__ import main

from conftest import write_fashion_mnist

TINY = [
    "--val-size",
    "40",
    "--epochs",
    "3",
    "--batch-size",
    "32",
    "--threads",
    "1",
    "--no-progress",
]
MODELS = {
    # model: (arguments, neurons per inference, training width, parameter count)
    "ff": (["--width", "32"], 32, 32, 784 * 32 + 32 + 32 * 10 + 10),
    "ultra": (["--depth", "3", "--parallel-size", "2"], 8, 30, 30 * (784 + 1 + 10)),
    "fff": (["--depth", "2", "--leaf-width", "4", "--hardening", "0.5"], None, None, None),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fashion-mnist")
    write_fashion_mnist(folder, n_train=400, n_test=120, gz=True)
    return folder


def run(args, tmp_path, capsys):
    out = tmp_path / "result.json"
    code = main(["train", *args, "--json", str(out)])
    captured = capsys.readouterr()
    return code, (json.loads(out.read_text()) if out.exists() else None), captured


@pytest.mark.parametrize("model", ["ff", "ultra", "fff"])
def test_end_to_end(model, data_dir, tmp_path, capsys):
    extra, neurons, width, params = MODELS[model]
    code, result, captured = run(
        ["--model", model, "--data", str(data_dir), *TINY, *extra], tmp_path, capsys
    )
    assert code == 0, captured.err
    assert "epoch 3/3" in captured.out and "test accuracy" in captured.out
    # the synthetic classes are bright bands: far above chance (0.1) after 3 short epochs
    assert result["test_accuracy"] > 0.6
    assert result["inference_seconds"] > 0 and result["train_seconds"] > 0
    assert result["inference_rows"] == 120
    assert len(result["history"]) == 3
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]
    if neurons is not None:
        assert result["neurons_per_inference"] == neurons
        assert result["training_width"] == width
        assert result["params"] == params
    assert result["config"]["model"] == model and result["config"]["epochs"] == 3
    assert result["config"]["model_config"]
    assert result["config"]["normalisation"]["std"] > 0
    half = result["half_precision"]  # the model converted to bfloat16, evaluated and timed
    assert half["dtype"] == "bfloat16" and half["inference_seconds"] > 0
    assert abs(half["test_accuracy"] - result["test_accuracy"]) <= 0.05
    assert "converted to bfloat16: test accuracy" in captured.out


def test_fff_learning_quality_options_and_routing_history(data_dir, tmp_path, capsys):
    """--load-balancing and --master-leaf reach the layer; each epoch reports the routing of
    the validation images; --save writes the trained model; --train-size trains on fewer."""
    import fastff

    saved = tmp_path / "model.npz"
    args = ["--model", "fff", "--data", str(data_dir), *TINY, *MODELS["fff"][0]]
    args += ["--load-balancing", "0.5", "--master-leaf", "--save", str(saved)]
    code, result, captured = run([*args, "--train-size", "200"], tmp_path, capsys)
    assert code == 0, captured.err
    assert "200 training, 40 validation" in captured.out
    assert captured.out.count("dead leaves") == 3 and "routing entropy" in captured.out
    config = result["config"]
    assert config["load_balancing"] == 0.5 and config["model_config"]["master_leaf"] is True
    assert result["neurons_per_inference"] == 2 + 2 * 4 and result["training_width"] == 5 * 4
    for record in result["history"]:
        routing = record["routing"]
        assert sum(routing["leaf_counts"]) == 40 and routing["node_counts"][0] == 40
        assert 0 <= routing["routing_entropy"] <= 2 and "dead_leaf_fraction" in routing
        assert record["balance_loss"] >= 1.0 - 1e-9  # soft: n_leaves * sum f^2 >= 1
    model = fastff.load(saved)
    assert model.master_leaf and model.get_config() == config["model_config"]


def test_ultra_routing_history(data_dir, tmp_path, capsys):
    args = ["--model", "ultra", "--data", str(data_dir), *TINY, *MODELS["ultra"][0]]
    code, result, captured = run(args, tmp_path, capsys)
    assert code == 0, captured.err
    assert "dead neurons" in captured.out
    routing = result["history"][-1]["routing"]
    assert len(routing["node_counts"]) == 30 and len(routing["leaf_counts"]) == 2
    assert all(sum(tree) == 40 for tree in routing["leaf_counts"])
    assert "balance_loss" not in result["history"][-1]


def test_ultra_load_balancing_reaches_the_layer(data_dir, tmp_path, capsys):
    args = ["--model", "ultra", "--data", str(data_dir), *TINY, *MODELS["ultra"][0]]
    code, result, captured = run([*args, "--load-balancing", "0.5"], tmp_path, capsys)
    assert code == 0, captured.err
    assert result["config"]["load_balancing"] == 0.5
    for record in result["history"]:  # each tree's n_leaves * sum f_l P_l, P_l <= f_l
        assert 0 < record["balance_loss"] <= len(record["routing"]["leaf_counts"][0])


@pytest.mark.parametrize(
    "options",
    [
        ["--optimizer", "sgd", "--schedule", "step", "--lr", "0.05"],
        ["--optimizer", "adamw", "--schedule", "onecycle", "--lr", "3e-3"],
        ["--schedule", "cosine", "--warmup-steps", "5", "--dtype", "float64"],
        ["--schedule", "constant"],
    ],
)
def test_optimizers_and_schedules(options, data_dir, tmp_path, capsys):
    code, result, captured = run(
        ["--model", "ff", "--width", "16", "--data", str(data_dir), *TINY, *options],
        tmp_path,
        capsys,
    )
    assert code == 0, captured.err
    assert result["test_accuracy"] > 0.5
    assert result["history"][-1]["train_loss"] < result["history"][0]["train_loss"]


def test_plain_progress_without_tqdm(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    args = [a for a in TINY if a != "--no-progress"]
    code, _, captured = run(
        ["--model", "ff", "--width", "8", "--data", str(data_dir), *args], tmp_path, capsys
    )
    assert code == 0
    assert [line.split()[1] for line in captured.out.splitlines() if line.startswith("epoch")] == [
        "1/3",
        "2/3",
        "3/3",
    ]


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "ultra", "--width", "64"], "--width applies to --model ff"),
        (["--model", "ff", "--leaf-width", "4"], "--leaf-width applies to --model fff"),
        (["--model", "ff", "--epochs", "0"], "--epochs must be >= 1"),
        (["--model", "ff", "--val-size", "400"], "leaves no training images"),
        (["--model", "ff", "--lr", "-1", "--val-size", "40"], "lr must be"),
        (["--model", "ultra", "--depth", "-2", "--val-size", "40"], "depth must be"),
        (["--model", "ff", "--master-leaf"], "--master-leaf applies to --model fff"),
        (["--model", "ff", "--load-balancing", "1"], "--load-balancing applies to --model"),
        (["--model", "ff", "--train-size", "0"], "--train-size must be >= 1"),
    ],
)
def test_usage_errors(args, words, data_dir, tmp_path, capsys):
    code, result, captured = run([*args, "--data", str(data_dir)], tmp_path, capsys)
    assert code == 2 and result is None
    assert words in captured.err


def test_missing_data_says_how_to_get_it(tmp_path, capsys):
    code, _, captured = run(["--model", "ff", "--data", str(tmp_path / "none")], tmp_path, capsys)
    assert code == 2
    assert str(tmp_path / "none") in captured.err and "apt-get install" in captured.err


def test_tqdm_progress_bar(data_dir, tmp_path, capsys):
    pytest.importorskip("tqdm")
    args = [a for a in TINY if a != "--no-progress"]
    code, _, captured = run(
        ["--model", "ff", "--width", "8", "--data", str(data_dir), *args], tmp_path, capsys
    )
    assert code == 0
    assert "epoch 2/3" in captured.err and "batch" in captured.err  # the bar, on stderr
    assert "epoch 3/3  loss" in captured.out  # the summary lines stay on stdout


def test_train_that_cannot_import_shows_the_real_error(monkeypatch, capsys):
    """Issue 18: `python -m fastff train` said "invalid choice: 'train' (choose from 'bench')"
    when fastff.train failed to import, hiding the ImportError."""
    monkeypatch.delitem(sys.modules, "fastff.train", raising=False)
    monkeypatch.setitem(sys.modules, "fastff.train", None)  # importing it raises ImportError
    code = main(["train", "--model", "ff"])
    err = capsys.readouterr().err
    assert code == 2 and "import of fastff.train halted" in err  # the ImportError itself
    assert "invalid choice" not in err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "ff", "--threads", "100000"], "--threads must be <="),
        (["--model", "fff", "--hardening", "-1"], "--hardening must be a finite number >= 0"),
        (["--model", "fff", "--load-balancing", "nan"], "--load-balancing must be a finite"),
        (["--model", "ff", "--save", "DIR"], "is a directory"),
        (["--model", "ultra", "--depth", "40"], "bytes"),
        (["--model", "ff", "--width", str(10**12)], "bytes"),
        (["--model", "ff", "--json", "DIR"], "is a directory"),
        (["--model", "ff", "--json", "/dev/full"], "not a regular file"),
        (["--model", "ff", "--data", "FILE"], "is a file, not a folder"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_any_work(args, words, tmp_path, capsys):
    """Issue 18: these ended in tracebacks, --json a directory only after the whole run."""
    (tmp_path / "file").write_text("x")
    args = [a.replace("DIR", str(tmp_path)).replace("FILE", str(tmp_path / "file")) for a in args]
    if "--data" not in args:
        args += ["--data", str(tmp_path / "missing")]  # no data: any work would fail on it
    code = main(["train", *args, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
