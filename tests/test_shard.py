"""fastff.distributed's tree-parallel layers (shard, ShardedUltraFFF, ShardedFFF) on real ranks.

Each test runs ``mpiexec -n R python script.py`` in a subprocess with a timeout (see
test_distributed.run_mpi), on 2 and 3 ranks (3: uneven subtree counts), skipped without
mpi4py or mpiexec. Every rank also holds the whole layer and runs it on the whole batch (the
ranks' rows stacked in rank order): that is the one-process run the shards are compared with.
"""

import numpy as np
import pytest
from test_distributed import needs_mpiexec, run_mpi

fd = pytest.importorskip("fastff.distributed")

COMMON = """
counts = [11 + 6 * r for r in range(size)]
counts[-1] = 0 if size > 2 else counts[-1]  # a rank with no rows takes part all the same
offset, n_total = sum(counts[:rank]), sum(counts)


def mine(a):
    return a[offset : offset + counts[rank]]


def allsame(arrays):
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays))
    return len(set(comm.allgather(digest.hexdigest()))) == 1
"""

INFERENCE = (
    COMMON
    + """
rng = np.random.default_rng(7)
checked = 0
for dtype in (np.float32, np.float64):
    X = rng.standard_normal((n_total, 3, 20)).astype(dtype)  # leading dimensions are kept
    # NaN and infinities route as in the whole layer (NaN: left) and propagate alike
    bad = X.copy()
    bad[::7, 0, 3], bad[1::7, 1, :2], bad[2::7, 2, 5] = np.nan, np.inf, -np.inf
    for T in (1, 2):
        for k in (None, 0, 1, 2, 5):
            if T << (k or 0) < size:
                continue
            for act in ("gelu", "relu"):
                whole = fastff.UltraFFF(20, 9, 5, parallel_size=T, activation=act, dtype=dtype,
                                        seed=5)
                sharded = fd.shard(whole, comm, top_levels=k)
                assert np.array_equal(sharded(mine(X)), mine(whole(X))), (T, k, act)
                got, expected = sharded(mine(bad)), mine(whole(bad))
                assert np.array_equal(got, expected, equal_nan=True), (T, k, act)
                built = fd.ShardedUltraFFF(20, 9, 5, parallel_size=T, activation=act,
                                           dtype=dtype, seed=5, comm=comm, top_levels=k)
                for key, value in sharded.state_dict().items():
                    assert np.array_equal(built.state_dict()[key], value), key
                full = fd.gather_state_dict(built, root=size - 1)
                if rank == size - 1:
                    for key, value in whole.state_dict().items():
                        assert np.array_equal(full[key], value), key
                else:
                    assert full is None
                checked += 1
    for k in (None, 0, 2, 4):
        if 1 << (k or 0) < size:
            continue
        whole = fastff.FFF(20, 3, 9, 4, dtype=dtype, seed=6)
        sharded = fd.shard(whole, comm, top_levels=k)
        assert np.array_equal(sharded(mine(X)), mine(whole(X))), k
        assert np.array_equal(sharded(mine(bad)), mine(whole(bad)), equal_nan=True), k
        built = fd.ShardedFFF(20, 3, 9, 4, dtype=dtype, seed=6, comm=comm, top_levels=k)
        assert np.array_equal(built(mine(X)), mine(whole(X))), k
        back = fd.unshard(built)
        if rank == 0:
            for key, value in whole.state_dict().items():
                assert np.array_equal(back.state_dict()[key], value), key
        checked += 1
# the default top levels give each rank at least 4 subtrees
assert fd.shard(fastff.UltraFFF(4, 2, 9, seed=0), comm).top_levels == (3 if size == 2 else 4)
# a communicator of size 1: the shard is the whole layer
alone = comm.Split(rank, 0)
whole = fastff.UltraFFF(20, 9, 5, seed=5)
one = fd.shard(whole, alone)
assert one.subtrees == range(0, 4) and np.array_equal(one(X[:, 0]), whole(X[:, 0]))
if rank == 0:
    print("INFERENCE OK", checked)
"""
)


@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_inference_is_the_whole_layers_bitwise(tmp_path, n):
    """UltraFFF (1 and 2 trees) and FFF at several top_levels, float32 and float64: the
    shards' outputs are bitwise the whole layer's; a shard built from the config holds exactly
    the whole layer's weights (same seed); gather_state_dict/unshard give the whole back."""
    out = run_mpi(tmp_path, INFERENCE, n=n)
    assert "INFERENCE OK" in out


TRAINING = (
    COMMON
    + """
STEPS = 10
rng = np.random.default_rng(0)
report = []


def train(name, make, kw, opt_kind, tol):
    whole, sharded = make(), fd.shard(make(), comm)
    opts = [SGD(m, lr=0.05, momentum=0.9) if opt_kind == "sgd" else AdamW(m, lr=1e-2)
            for m in (whole, sharded)]
    worst_dx = 0.0
    for step in range(STEPS):
        X = rng.standard_normal((n_total, whole.input_width)).astype(whole.dtype)
        T = rng.standard_normal((n_total, whole.output_width)).astype(whole.dtype)
        y, backprop = whole.forward_train(X, **kw)
        whole.zero_grad()
        dx = backprop((y - T) / n_total)  # the gradient of the batch mean of |y - t|^2 / 2
        ys, backprop = sharded.forward_train(mine(X), **kw)
        sharded.zero_grad()
        dxs = backprop((ys - mine(T)) / n_total)
        if step == 0:  # without input_grad: no dx, bitwise the same gradients
            other = fd.shard(make(), comm)
            yo, backprop = other.forward_train(mine(X), input_grad=False, **kw)
            other.zero_grad()
            assert backprop((yo - mine(T)) / n_total) is None and np.array_equal(yo, ys), name
            for (key, g), (key_o, g_o) in zip(sharded.grads.items(), other.grads.items()):
                assert key == key_o and np.array_equal(g, g_o), (name, key)
        if step == 0 and getattr(whole, "train_hardened", True):
            assert np.array_equal(ys, mine(y)), name  # one path per row: the same bits
        assert np.allclose(ys, mine(y), rtol=0, atol=tol * 10), name
        worst_dx = max(worst_dx, float(np.max(np.abs(dxs - mine(dx)), initial=0)))
        if hasattr(whole, "last_mean_entropy"):
            assert abs(sharded.last_mean_entropy - whole.last_mean_entropy) < tol * 10
        for o in opts:
            o.step()
    full = fd.gather_state_dict(sharded)
    tops = [v for k, v in sharded.state_dict().items() if k.startswith("top.")]
    assert allsame(tops), "the replicated top levels drifted apart"
    if rank == 0:
        ref = whole.state_dict()
        diff = max(float(np.max(np.abs(full[k] - ref[k]))) for k in ref)
        assert diff <= tol and worst_dx <= tol * 10, (name, diff, worst_dx)
        report.append(f"{name} max|diff| {diff:.3g}")


for dt, tol in ((np.float64, 1e-12), (np.float32, 1e-6)):
    d = np.dtype(dt).name
    train(f"ultra {d} adamw", lambda: fastff.UltraFFF(16, 6, 5, dtype=dt, seed=3), {}, "adamw", tol)
    train(f"ultra T=2 {d} sgd", lambda: fastff.UltraFFF(16, 6, 4, parallel_size=2,
          activation="relu", dtype=dt, seed=3), {}, "sgd", tol)
    train(f"fff hardened {d} adamw", lambda: fastff.FFF(16, 4, 6, 4, train_hardened=True,
          region_leak=0.2, dropout=0.1, dtype=dt, seed=4), {"hardening": 0.1}, "adamw", tol)
    train(f"fff soft {d} adamw", lambda: fastff.FFF(16, 4, 6, 4, region_leak=0.2, dropout=0.1,
          dtype=dt, seed=4), {"hardening": 0.1}, "adamw", tol)
import functools


# a model mixing replicated layers (allreduce_grads, op="sum") and a sharded one
def model(sharded):
    tree = fastff.UltraFFF(16, 16, 5, seed=2)
    tree = fd.shard(tree, comm) if sharded else tree
    linear = functools.partial(fastff.nn.Linear, seed=3)
    return fastff.nn.Sequential(linear(8, 16, seed=1), fastff.nn.GELU(), tree, linear(16, 4))


mixed, whole = model(True), model(False)
opts = [AdamW(whole, lr=1e-2), AdamW(mixed, lr=1e-2)]
for step in range(5):
    X = rng.standard_normal((n_total, 8)).astype(np.float32)
    T = rng.standard_normal((n_total, 4)).astype(np.float32)
    y, backprop = whole.forward_train(X)
    whole.zero_grad()
    backprop((y - T) / n_total)
    y, backprop = mixed.forward_train(mine(X))
    mixed.zero_grad()
    backprop((y - mine(T)) / n_total)
    fd.allreduce_grads(mixed, comm, op="sum")  # leaves the sharded layer to itself
    for o in opts:
        o.step()
ref, got = whole.state_dict(), mixed.state_dict()
for key in ("0.weight", "0.bias", "3.weight", "3.bias"):
    assert np.max(np.abs(got[key] - ref[key])) <= 1e-6, key
if rank == 0:
    print("\\n".join(report))
    print("TRAINING OK")
"""
)


@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_sharded_training_follows_the_whole_layer(tmp_path, n):
    """10 steps of AdamW (SGD with momentum for the 2-tree UltraFFF) on the shards end with
    the whole layer's weights to rounding (float64 1e-12, float32 1e-6), for UltraFFF, hardened
    FFF and soft FFF, with region leak, dropout and the hardening loss; dx agrees; the top
    levels stay identical on every rank."""
    out = run_mpi(tmp_path, TRAINING, n=n, timeout=180)
    print(out)
    assert "TRAINING OK" in out


ERRORS = (
    COMMON
    + """
def expect(exc, words, call):
    try:
        call()
    except exc as e:
        assert all(w in str(e) for w in words), (rank, e)
    else:
        raise AssertionError(f"rank {rank}: no {exc.__name__} for {words}")


layer = fastff.UltraFFF(8, 3, 3, seed=0)
# configs that differ by rank, seeds that differ, a layer that differs: every rank raises
expect(ValueError, ["different layers", "depth 3 vs 4"],
       lambda: fd.ShardedUltraFFF(8, 3, 3 + (rank > 0), comm=comm))
expect(ValueError, ["different seeds"], lambda: fd.ShardedFFF(8, 2, 3, 3, seed=rank, comm=comm))
expect(ValueError, ["weights differ"], lambda: fd.shard(fastff.UltraFFF(8, 3, 3, seed=rank), comm))
expect(TypeError, ["UltraFFF or an FFF"],
       lambda: fd.shard(layer if rank else fastff.nn.Linear(8, 3), comm))
# more ranks than subtrees, too many top levels, usage counters
expect(ValueError, ["fewer than the", "use at most 1 ranks"],
       lambda: fd.shard(fastff.FFF(8, 2, 3, 0, seed=0), comm))
expect(ValueError, ["fewer than the", "raise top_levels"],
       lambda: fd.shard(layer, comm, top_levels=0))
expect(ValueError, ["top_levels", "at most"], lambda: fd.shard(layer, comm, top_levels=4))
expect(ValueError, ["usage"], lambda: fd.ShardedFFF(8, 2, 3, 3, usage_mode="hard", comm=comm))
sharded = fd.shard(layer, comm)
x = np.ones((5, 8))
# a bad input on one rank: its own error there, the same type (naming it) everywhere else
expect(ValueError, ["shape"], lambda: sharded(np.ones((5, 8 + (rank == 1)))))
expect(TypeError, [], lambda: sharded(np.array(["a"]) if rank == 0 else x))
# different calls on different ranks
expect(RuntimeError, ["different calls"],
       lambda: sharded(x) if rank == 0 else sharded.forward_train(x))
# an exchange too large for MPI's int counts on one rank raises on every rank, no hang
import fastff.distributed._common as common

common.MAX_ROWS, limit = 3, common.MAX_ROWS
expect(OverflowError, ["more than 3 rows in one exchange"],
       lambda: sharded(x if rank == 0 else x[:0]))
common.MAX_ROWS = limit
# input_grad must agree: its dx exchange is skipped without it
expect(RuntimeError, ["different calls"],
       lambda: sharded.forward_train(x, input_grad=rank == 0))
expect(TypeError, ["input_grad must be True or False"],
       lambda: sharded.forward_train(x, input_grad="no" if rank == 0 else True))
y, backprop = sharded.forward_train(x)
expect(ValueError, ["dy must have the shape"], lambda: backprop(np.ones((5 + rank, 3))))
backprop(np.ones((5, 3)))
expect(RuntimeError, ["already ran"], lambda: backprop(np.ones((5, 3))))
y, backprop = sharded.forward_train(x)
AdamW(sharded, lr=0.1).step()
expect(RuntimeError, ["stale"], lambda: backprop(np.ones((5, 3))))
expect(ValueError, ["CPU only"], lambda: sharded.to("cuda"))
expect(TypeError, ["keeps the dtype"], lambda: sharded.astype(np.float64))
expect(TypeError, ["float32 or float64"], lambda: fd.ShardedUltraFFF(8, 3, 3, dtype=np.float16))
# the masks' stream must be the same everywhere
fff = fd.ShardedFFF(8, 2, 3, 3, region_leak=0.5, seed=1, comm=comm)
expect(ValueError, ["random streams differ"],
       lambda: fff.forward_train(x, rng=np.random.default_rng(rank)))
fff.forward_train(x, rng=np.random.default_rng(3))
expect(RuntimeError, ["different calls"],
       lambda: fff.forward_train(x, rng=np.random.default_rng(3), input_grad=rank > 0))
# save per shard, load per shard; a wrong rank count or a missing file raises everywhere
for ext in ("safetensors", "npz"):
    path = fd.save_shard(sharded, f"tree.{ext}")
    assert path == f"tree.rank{rank}-of-{size}.{ext}", path
    again = fd.load_shard(f"tree.{ext}", comm)
    assert np.array_equal(again(x), sharded(x))
    if rank == 0:  # fastff.load alone gives the shard, detached
        detached = fastff.load(path)
        expect(RuntimeError, ["no communicator", "load_shard"], lambda: detached(x))
    alone = comm.Split(rank, 0)  # one rank: looks for tree.rank0-of-1.<ext>, absent
    expect(
        FileNotFoundError, [f"tree.rank0-of-1.{ext}"], lambda: fd.load_shard(f"tree.{ext}", alone)
    )
# files named by rank only: a run with another rank count finds them, and is refused
fd.save_shard(sharded, "w{rank}.npz")
expect(ValueError, ["rank 0 of 1", f"of {size}"], lambda: fd.load_shard("w{rank}.npz", alone))
if rank == 0:
    import os
    os.remove(f"tree.rank0-of-{size}.npz")
expect(FileNotFoundError, ["tree.rank0"], lambda: fd.load_shard("tree.npz", comm))
expect(TypeError, ["from its weight file"],
       lambda: fd.ShardedUltraFFF.from_config(sharded.get_config()))
if rank == 0:
    print("ERRORS OK")
"""
)


@needs_mpiexec
@pytest.mark.parametrize("n", [2, 3])
def test_bad_input_raises_on_every_rank_and_never_hangs(tmp_path, n):
    """Mismatched configs, seeds and layers, more ranks than subtrees, bad rows on one rank,
    different calls on different ranks, stale or repeated backprops, differing mask streams,
    and per-shard files (saved, reloaded, refused with a wrong rank count or when missing):
    clear errors on every rank, within the subprocess timeout."""
    out = run_mpi(tmp_path, ERRORS, n=n)
    assert "ERRORS OK" in out


def test_shard_paths_and_plans():
    from fastff.distributed._common import Plan, choose_top_levels

    assert fd.shard_path("a/tree.safetensors", 1, 3) == "a/tree.rank1-of-3.safetensors"
    assert fd.shard_path("w-{rank}of{size}.npz", 2, 4) == "w-2of4.npz"
    plan = Plan(n_trees=1, depth=5, top_levels=2, size=3, rank=0)
    assert plan.bounds.tolist() == [0, 2, 3, 4]  # uneven: the first rank one more
    assert plan.owner(np.arange(4)).tolist() == [0, 0, 1, 2]
    assert [plan.of(r).n_local for r in range(3)] == [2, 1, 1]
    assert list(Plan(3, 4, 1, 2, 0).runs()) == [(0, 0, 2, 0), (1, 0, 1, 2)]  # two trees
    assert choose_top_levels(None, 1, 10, 2, "x") == 3
    assert choose_top_levels(None, 4, 10, 2, "x") == 1
    assert choose_top_levels(None, 1, 1, 2, "x") == 1
    with pytest.raises(ValueError, match="at most 2 ranks"):
        choose_top_levels(None, 1, 1, 3, "x")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_init_stream_is_read_at_any_position(dtype):
    """InitStream reads numpy's default_rng(seed) stream at a position without drawing what
    comes before (float32 draws take half a 64-bit output each)."""
    from fastff.distributed._common import InitStream

    rng = np.random.default_rng(12)
    stream = [rng.random(n, dtype=dtype) for n in (1001, 3, 77)]  # separate calls, one stream
    whole = np.concatenate(stream) * dtype(2 * 0.5) - dtype(0.5)
    reader = InitStream(12, np.dtype(dtype))
    for pos in (0, 1, 2, 999, 1000, 1001, 1002, 1003):
        for n in (1, 2, 5, 20):
            np.testing.assert_array_equal(reader.uniform(pos, n, 0.5), whole[pos : pos + n])


@needs_mpiexec
def test_distributed_bench_reports_steps_and_bytes(tmp_path):
    """`mpiexec -n 2 python -m fastff bench --distributed`: per-step times of both kinds of
    parallelism and the bytes each collective moved, as JSON."""
    import json
    import os
    import subprocess
    import sys

    from test_distributed import MPIEXEC, REPO

    path = tmp_path / "bench.json"
    command = [MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "fastff", "bench"]
    proc = subprocess.run(
        command + ["--distributed", "--repeat", "1", "--threads", "2", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=180,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(path.read_text())
    assert result["ranks"] == 2 and result["threads_per_rank"] == 1
    assert result["data_parallel"]["allreduce_payload_bytes"] == (2 * 768 + 1) * 4095 * 4
    tree = result["tree_parallel"]
    assert tree["subtrees_per_rank"] == [4, 4] and tree["train_step_ms"] > 0
    for moved in tree["inference_bytes"]:  # about half of each rank's rows go and come back
        assert 0 < moved["alltoallv"] < 2048 * 2 * (768 * 4 + 8)
    top = (2**3 - 1) * (768 + 1 + 768) * 4  # the top levels' gradients, summed over ranks
    assert all(moved["allreduce"] == top for moved in tree["train_step_bytes"])
    assert "data parallel" in proc.stdout and "tree parallel" in proc.stdout
