"""GPU probe for issue 24: where can `gpu-ufb` UltraFFF inference go on an H100/H200?

Shape: x (8192, 768) fp32 ~ N(0, 1); one tree of depth 11 (4095 nodes, 12 visited per row);
w_in (4095, 768), b_in (4095,), w_out_t (4095, 768) node-major; exact GELU; right iff z > 0.

Variants (kernels in benchmarks/gpu_probe.cu, compiled twice: [d] with ptxas' default register
target and [m1] with __launch_bounds__(256, 1), which lets ptxas keep a node's 12 loads in flight):
  A   fastff's own kernel (fastff.UltraFFF(...).to("cuda")(x)): the number to beat.
  P   plain warp per row, float4 loads, x / y in registers, w_out_t row requested with w_in's:
      the baseline every restructuring is measured against (and bit-for-bit the order B uses).
  C   more independent walks per warp for memory-level parallelism: 2 rows per warp
      interleaved (32 lanes each), or a half warp (16 lanes) per row.
  B   rows grouped by subtree: phase 1 walks the top L levels (w_in only) and drops each row in
      the bucket of its level-L node (atomic slot; overflow list past a fixed capacity); phase 2
      gives each block one chunk of one bucket, so its warps share the top path and subtree
      (L1 hits on shared node rows), adds the L top terms from the saved activations and walks
      on from level L. Every row's result is deterministic (only rows' order in a bucket varies).
  D   bf16 weights (x, y, b_in fp32; fp32 accumulation; 8 weights per 16-byte load) on P, C, B.
  cuBLAS dense fp32 gelu(x W_in^T + b) W_out^T (TF32 off), and an x -> y copy (the HBM floor).

Checks: the first 512 rows against a float64 NumPy walk on the host (fp32: rel err < 1e-4;
bf16: against the bf16-rounded weights widened to float64, < 1e-3; rows whose reference path
has |z| < 1e-5 are counted as ambiguous, not failed), every row written (y pre-filled with NaN),
and all 8192 rows against P of the same weight dtype (B reproduces P bit for bit).

Timing: CUDA events; a spin kernel is queued first so the host's launch overhead stays out of the
numbers. "med"/"min": per call over 21 samples of 10 back-to-back calls; "1call": one call alone
(the pipeline's launch gaps included), median of 21.

    python benchmarks/gpu_probe.py --json out.json     # on a GPU
    python benchmarks/gpu_probe.py --selftest          # host logic only, no GPU or CuPy needed
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import numpy as np

IN_W = OUT_W = 768
DEPTH = 11
N_NODES = 2 ** (DEPTH + 1) - 1
BATCH = 8192
CHECK_ROWS = 512
TOL = {"fp32": 1e-4, "bf16": 1e-3}
AMBIGUOUS_Z = 1e-5
CU_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_probe.cu")
CTYPE = {"fp32": "float", "bf16": "unsigned short"}


# ---- host logic (NumPy only; --selftest checks it without a GPU) -----------------------------
def gelu64(z):
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))


def to_bf16_bits(w):
    """float32 -> bf16 bit patterns (uint16), round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(w, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def from_bf16_bits(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def reference_forward(x, w_in, b_in, w_out_t, depth):
    """float64 hard-path walk. Returns y and, per row, the smallest |z| on its path."""
    x64 = np.asarray(x, np.float64)
    w_in64, b64, wo64 = (np.asarray(a, np.float64) for a in (w_in, b_in, w_out_t))
    n = x64.shape[0]
    node = np.zeros(n, np.int64)
    y = np.zeros((n, wo64.shape[1]))
    zmin = np.full(n, np.inf)
    for _ in range(depth + 1):
        z = np.einsum("ij,ij->i", w_in64[node], x64) + b64[node]
        y += gelu64(z)[:, None] * wo64[node]
        zmin = np.minimum(zmin, np.abs(z))
        node = 2 * node + 1 + (z > 0)
    return y, zmin


def ancestor(node_at_level, level, ancestor_level):
    """Node index of the ancestor at `ancestor_level` (as sub_walk computes it)."""
    return ((node_at_level + 1) >> (level - ancestor_level)) - 1


def bucket_plan(n_rows, L, chunk, warps, lpr):
    """Launch geometry of the grouped pipeline (B): bucket capacity `cap` (2x the mean plus
    slack, a multiple of `chunk`), phase-2 blocks per bucket `cpb`, overflow-list blocks."""
    nb = 1 << L
    expected = -(-n_rows // nb)
    cpb = max(1, -(-(2 * expected + 32) // chunk))
    overflow_blocks = min(-(-n_rows // chunk), 16)
    return {
        "L": L,
        "chunk": chunk,
        "warps": warps,
        "lpr": lpr,
        "nb": nb,
        "cap": cpb * chunk,
        "cpb": cpb,
        "overflow_blocks": overflow_blocks,
        "grid2": nb * cpb + overflow_blocks,
    }


def simulate_grouping(node_at_L, plan):
    """Mirror of top_walk's slotting (rows in index order) and sub_walk's block/warp loops.
    Returns the rows phase 2 would process, in its order; each must appear exactly once."""
    nb, cap, chunk, cpb = plan["nb"], plan["cap"], plan["chunk"], plan["cpb"]
    groups = 32 // plan["lpr"]
    counts = np.zeros(nb + 1, np.int64)
    table = np.full(nb * cap, -1, np.int64)
    overflow = []
    for row, node in enumerate(node_at_L):
        b = int(node) - (nb - 1)
        slot = counts[b]
        counts[b] += 1
        if slot < cap:
            table[b * cap + slot] = row
        else:
            overflow.append(row)
            counts[nb] += 1
    done = []
    for blk in range(plan["grid2"]):
        if blk < nb * cpb:
            b, j = divmod(blk, cpb)
            count, lst, stride = min(counts[b], cap), table[b * cap : (b + 1) * cap], cap
        else:
            j = blk - nb * cpb
            count, lst, stride = counts[nb], overflow, plan["overflow_blocks"] * chunk
        start = j * chunk
        while start < count:
            end = min(count, start + chunk)
            for w in range(plan["warps"]):
                pos0 = start + w * groups
                while pos0 < end:
                    done += [int(lst[p]) for p in range(pos0, pos0 + groups) if p < end]
                    pos0 += plan["warps"] * groups
            start += stride
    return done, counts


def check_rows(y_rows, ref, zmin, tol):
    """Errors of y_rows against the float64 reference. Rows whose reference path passes a
    |z| < AMBIGUOUS_Z may legitimately route differently: they are counted, not failed."""
    y64 = np.asarray(y_rows, np.float64)
    clear = zmin >= AMBIGUOUS_Z
    finite = np.isfinite(y64).all(axis=1)
    diff = np.linalg.norm(np.where(finite[:, None], y64 - ref, 0.0), axis=1)
    row_rel = np.where(finite, diff / np.linalg.norm(ref, axis=1), np.inf)
    keep = clear & finite
    rel = float(np.linalg.norm(diff[keep]) / np.linalg.norm(ref[keep])) if keep.any() else np.inf
    bad = row_rel > tol
    return {
        "rel_err": rel,
        "max_row_rel": float(row_rel[clear].max()) if clear.any() else np.inf,
        "bad_rows": int(bad.sum()),
        "bad_unexplained": int((bad & clear).sum()),
        "ambiguous_rows": int((~clear).sum()),
        "ok": bool(rel < tol and not (bad & clear).any()),
    }


def selftest():
    rng = np.random.default_rng(1)
    # bf16 rounding: exact values, ties to even, error bound
    v = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.5, 0.0], np.float32)
    assert to_bf16_bits(v).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0]
    w = rng.standard_normal(10000).astype(np.float32)
    assert np.all(np.abs(from_bf16_bits(to_bf16_bits(w)) - w) <= np.abs(w) * 2.0**-8)
    # ancestors by shifts == repeated parent steps
    for L in range(1, 9):
        nodes = np.arange(2**L - 1, 2 ** (L + 1) - 1)
        for lvl in range(L):
            par = nodes.copy()
            for _ in range(L - lvl):
                par = (par - 1) // 2
            assert np.array_equal(ancestor(nodes, L, lvl), par)
    # the walk reference == the dense masked reference (DESIGN.md section 1)
    n, d_in, d_out, depth = 64, 12, 5, 4
    nn_ = 2 ** (depth + 1) - 1
    x = rng.standard_normal((n, d_in))
    wi, bi, wo = (
        rng.standard_normal((nn_, d_in)),
        rng.standard_normal(nn_),
        rng.standard_normal((nn_, d_out)),
    )
    z = x @ wi.T + bi
    mask = np.zeros_like(z)
    node = np.zeros(n, np.int64)
    for _ in range(depth + 1):
        mask[np.arange(n), node] = 1
        node = 2 * node + 1 + (z[np.arange(n), node] > 0)
    y_dense = (gelu64(z) * mask) @ wo
    y_walk, zmin = reference_forward(x, wi, bi, wo, depth)
    assert np.allclose(y_walk, y_dense, rtol=1e-12, atol=1e-12) and np.all(zmin > 0)
    # grouping covers every row once: balanced, skewed (overflow), tiny batches
    for n_rows, L, chunk, warps, lpr, skew in [
        (8192, 7, 32, 8, 32, False),
        (8192, 5, 64, 8, 16, False),
        (8192, 6, 16, 4, 32, True),
        (37, 5, 32, 8, 32, False),
        (1, 7, 16, 8, 16, True),
    ]:
        plan = bucket_plan(n_rows, L, chunk, warps, lpr)
        nb = plan["nb"]
        if skew:
            node_at_L = np.where(
                rng.random(n_rows) < 0.7, nb - 1, rng.integers(nb - 1, 2 * nb - 1, n_rows)
            )
        else:
            node_at_L = rng.integers(nb - 1, 2 * nb - 1, n_rows)
        done, counts = simulate_grouping(node_at_L, plan)
        assert sorted(done) == list(range(n_rows)), (n_rows, L, chunk, skew)
        assert (counts[nb] > 0) == (
            np.bincount(node_at_L - (nb - 1), minlength=nb).max() > plan["cap"]
        )
    # check_rows: exact, perturbed, ambiguous, unwritten rows
    ref = rng.standard_normal((8, 6))
    zmin = np.full(8, 1.0)
    assert check_rows(ref, ref, zmin, 1e-4)["ok"]
    y = ref.copy()
    y[3] += 1.0
    r = check_rows(y, ref, zmin, 1e-4)
    assert not r["ok"] and r["bad_unexplained"] == 1
    zmin[3] = 1e-7
    r = check_rows(y, ref, zmin, 1e-4)
    assert r["ok"] and r["ambiguous_rows"] == 1 and r["bad_rows"] == 1
    y[5] = np.nan
    assert not check_rows(y, ref, zmin, 1e-4)["ok"]
    print("selftest: ok")


# ---- device part -----------------------------------------------------------------------------
def make_weights():
    """The layer fastff builds for seed 0 (so A and the probe kernels share weights), or the
    same distribution from NumPy when fastff cannot be imported."""
    try:
        import fastff

        layer = fastff.UltraFFF(IN_W, OUT_W, DEPTH, seed=0)
        sd = {k: np.asarray(v) for k, v in layer.state_dict().items()}
        w_in = np.ascontiguousarray(sd["linear_in.weight"], np.float32)
        b_in = np.ascontiguousarray(sd["linear_in.bias"], np.float32)
        w_out_t = np.ascontiguousarray(sd["linear_out.weight"].T, np.float32)
        return w_in, b_in, w_out_t, layer, None
    except Exception as exc:  # the probe runs on without fastff
        rng = np.random.default_rng(0)
        k_in, k_out = IN_W**-0.5, (DEPTH + 1) ** -0.5
        w_in = rng.uniform(-k_in, k_in, (N_NODES, IN_W)).astype(np.float32)
        b_in = rng.uniform(-k_in, k_in, N_NODES).astype(np.float32)
        w_out_t = rng.uniform(-k_out, k_out, (N_NODES, OUT_W)).astype(np.float32)
        return w_in, b_in, w_out_t, None, f"{type(exc).__name__}: {exc}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--selftest", action="store_true", help="host logic only, then exit")
    ap.add_argument("--skip-fastff", action="store_true", help="no variant A")
    args = ap.parse_args(argv)
    selftest()
    if args.selftest:
        return 0
    os.environ.setdefault("CUPY_TF32", "0")
    import cupy as cp

    t_start = time.time()
    results = {"shape": f"x({BATCH},{IN_W}) depth {DEPTH}", "variants": [], "notes": []}

    def note(msg):
        print(msg, flush=True)
        results["notes"].append(msg)

    def dump():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=float)

    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    sm_count = props.get("multiProcessorCount", "?")
    l2_mib = props.get("l2CacheSize", 0) >> 20
    try:  # CUDA 13 dropped cudaDeviceProp.clockRate; the attribute remains
        clock_khz = cp.cuda.runtime.deviceGetAttribute(13, cp.cuda.Device().id)  # ClockRate
    except Exception:
        clock_khz = 0
    clock_khz = clock_khz or 1980000
    results["device"] = (
        f"{name}, {sm_count} SMs, L2 {l2_mib} MiB, SM clock {clock_khz // 1000} MHz, "
        f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}, driver "
        f"{cp.cuda.runtime.driverGetVersion()}, CuPy {cp.__version__}, "
        f"CUPY_TF32={os.environ.get('CUPY_TF32')}"
    )
    note(results["device"])

    # -- data, weights, host references ------------------------------------------------------
    x = np.random.default_rng(0).standard_normal((BATCH, IN_W)).astype(np.float32)
    w_in, b_in, w_out_t, layer, fastff_err = make_weights()
    if fastff_err:
        note(f"fastff unavailable ({fastff_err}); NumPy weights of the same distribution")
    w_bits = {"in": to_bf16_bits(w_in), "out": to_bf16_bits(w_out_t)}
    t0 = time.time()
    xs = x[:CHECK_ROWS]
    refs = {
        "fp32": reference_forward(xs, w_in, b_in, w_out_t, DEPTH),
        "bf16": reference_forward(
            xs, from_bf16_bits(w_bits["in"]), b_in, from_bf16_bits(w_bits["out"]), DEPTH
        ),
    }
    note(
        f"host references ({CHECK_ROWS} rows, float64) in {time.time() - t0:.1f} s; "
        f"ambiguous rows fp32 {int((refs['fp32'][1] < AMBIGUOUS_Z).sum())}, "
        f"bf16 {int((refs['bf16'][1] < AMBIGUOUS_Z).sum())}"
    )

    stream = cp.cuda.Stream(non_blocking=True)
    stream.use()
    xg = cp.asarray(x)
    weights = {
        "fp32": (cp.asarray(w_in), cp.asarray(b_in), cp.asarray(w_out_t)),
        "bf16": (cp.asarray(w_bits["in"]), cp.asarray(b_in), cp.asarray(w_bits["out"])),
    }

    # -- kernels -----------------------------------------------------------------------------
    with open(CU_SOURCE) as f:
        code = f.read()
    names = ["spin"]
    for ct in CTYPE.values():
        names += [f"walk_full<{ct}, {lpr}, {r}>" for lpr, r in ((32, 1), (32, 2), (16, 1))]
        names += [f"top_walk<{ct}, 32>"] + [f"sub_walk<{ct}, {lpr}>" for lpr in (32, 16)]
    modules = {}
    for tag, defs in (("d", ()), ("m1", ("-DMINB=1",))):
        t0 = time.time()
        opts = ("-std=c++17", f"-DIN_W={IN_W}", f"-DOUT_W={OUT_W}", f"-DDEPTH={DEPTH}") + defs
        try:
            mod = cp.RawModule(code=code, options=opts, name_expressions=names)
        except Exception as exc:  # that module's variants then report the error
            note(f"module [{tag}] failed: {type(exc).__name__}: {exc}")
            modules[tag] = None
            continue
        regs = {}
        for nm in names:
            try:  # loads the module; register counts are informative only
                attrs = mod.get_function(nm).attributes
                regs[nm] = (attrs.get("num_regs"), attrs.get("local_size_bytes"))
            except Exception as exc:
                regs[nm] = (f"? ({type(exc).__name__})", "?")
        modules[tag] = mod
        note(
            f"module [{tag}] compiled+loaded in {time.time() - t0:.1f} s; regs/local bytes: "
            + ", ".join(f"{nm}={r}/{lb}" for nm, (r, lb) in regs.items() if nm != "spin")
        )
    try:
        spin = (modules["d"] or modules["m1"]).get_function("spin")
    except Exception as exc:
        note(f"no spin kernel ({exc}): host launch overhead may enter the times")
        spin = None

    def spin_us(us):
        if spin is not None:
            spin((1,), (32,), (np.int64(int(us * clock_khz / 1000)),))

    def set_carveout(kernels, value):
        for k in kernels:
            try:
                k.preferred_shared_memory_carveout = value
            except Exception as exc:
                note(f"carveout {value} not set: {exc}")
                return

    # -- timing ------------------------------------------------------------------------------
    def ev():
        return cp.cuda.Event()

    def time_fn(fn, batch=10, samples=21, spin_batch_us=3000.0, spin_one_us=300.0):
        fn()
        fn()
        stream.synchronize()
        per_call = []
        for _ in range(samples):
            spin_us(spin_batch_us)  # the host queues the batch while this runs
            a, b = ev(), ev()
            a.record(stream)
            for _ in range(batch):
                fn()
            b.record(stream)
            b.synchronize()
            per_call.append(cp.cuda.get_elapsed_time(a, b) * 1e3 / batch)
        single = []
        for _ in range(samples):
            spin_us(spin_one_us)
            a, b = ev(), ev()
            a.record(stream)
            fn()
            b.record(stream)
            b.synchronize()
            single.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
        return {
            "med_us": float(np.median(per_call)),
            "min_us": float(np.min(per_call)),
            "one_call_us": float(np.median(single)),
        }

    # -- variants ----------------------------------------------------------------------------
    y_ref_gpu = {}  # full-batch output of P [d] per weight dtype: the all-rows comparison

    def verify(y, dt):
        y_host = cp.asnumpy(y[:CHECK_ROWS])
        out = check_rows(y_host, refs[dt][0], refs[dt][1], TOL[dt])
        unwritten = int((~cp.isfinite(y).all(axis=1)).sum())
        out["unwritten_rows"] = unwritten
        out["ok"] = out["ok"] and unwritten == 0
        if dt in y_ref_gpu:
            p = y_ref_gpu[dt]
            out["rows_differing_from_P"] = int((y != p).any(axis=1).sum())
            row_rel = cp.linalg.norm(y - p, axis=1) / cp.linalg.norm(p, axis=1)
            out["rows_over_tol_vs_P"] = int((row_rel > TOL[dt]).sum())
        return out

    def run_variant(label, dt, fn, y=None, kernels=(), carveout=0, extra=None, keep_as_p=False):
        """Verify then time one variant; any failure is recorded and the probe goes on."""
        rec = {"variant": label, "dtype": dt, **(extra or {})}
        try:
            if kernels:
                set_carveout(kernels, carveout)
                rec["carveout"] = carveout
            if dt in TOL:
                if y is not None:
                    y.fill(np.nan)
                out = fn()
                stream.synchronize()
                rec.update(verify(out if y is None else y, dt))
                if keep_as_p:
                    y_ref_gpu[dt] = (out if y is None else y).copy()
            rec.update(time_fn(fn))
        except Exception as exc:  # report and go on
            rec["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            try:
                stream.synchronize()
            except Exception:
                pass
        results["variants"].append(rec)
        brief = {k: rec[k] for k in ("med_us", "min_us", "one_call_us", "rel_err") if k in rec}
        msg = " ".join(f"{k}={v:.4g}" for k, v in brief.items())
        print(
            f"  {label:<44} {msg} {'ERROR ' + rec['error'] if 'error' in rec else ''}", flush=True
        )
        dump()
        return rec

    y_work = cp.empty((BATCH, OUT_W), cp.float32)

    def full_walk(mod_tag, dt, lpr, r):
        try:
            k = modules[mod_tag].get_function(f"walk_full<{CTYPE[dt]}, {lpr}, {r}>")
        except Exception as exc:  # reported by run_variant
            err = f"{type(exc).__name__}: {exc}"

            def failed():
                raise RuntimeError(err)

            return failed, []
        wi, bi, wo = weights[dt]
        rows_per_block = 8 * (32 // lpr) * r
        grid = (-(-BATCH // rows_per_block),)
        args = (xg, wi, bi, wo, y_work, np.int32(BATCH))

        def fn():
            k(grid, (256,), args)
            return y_work

        return fn, [k]

    class Grouped:
        """Variant B's pipeline: top_walk then sub_walk (two launches, no memset)."""

        def __init__(self, mod_tag, dt, L, chunk, warps, lpr):
            mod = modules[mod_tag]
            self.top = mod.get_function(f"top_walk<{CTYPE[dt]}, 32>")
            self.sub = mod.get_function(f"sub_walk<{CTYPE[dt]}, {lpr}>")
            self.plan = p = bucket_plan(BATCH, L, chunk, warps, lpr)
            self.counters = [cp.zeros(p["nb"] + 1, cp.int32) for _ in range(2)]
            self.table = cp.empty(p["nb"] * p["cap"], cp.int32)
            self.overflow = cp.empty(BATCH, cp.int32)
            self.node_at_L = cp.empty(BATCH, cp.int32)
            self.acts = cp.empty(BATCH * L, cp.float32)
            self.w = weights[dt]
            self.calls = 0
            self.grid1 = (-(-BATCH // 8),)

        def launch_top(self):
            p, (wi, bi, _) = self.plan, self.w
            cur = self.counters[self.calls % 2]
            nxt = self.counters[(self.calls + 1) % 2]  # zeroed here for the next call
            self.top(
                self.grid1,
                (256,),
                (xg, wi, bi, np.int32(BATCH), np.int32(p["L"]), np.int32(p["cap"]), cur,
                 self.table, self.overflow, self.node_at_L, self.acts, nxt,
                 np.int32(p["nb"] + 1)),
            )  # fmt: skip

        def launch_sub(self):
            p, (wi, bi, wo) = self.plan, self.w
            cur = self.counters[self.calls % 2]
            self.sub(
                (p["grid2"],),
                (32 * p["warps"],),
                (xg, wi, bi, wo, y_work, np.int32(p["L"]), np.int32(p["cap"]),
                 np.int32(p["chunk"]), np.int32(p["cpb"]), np.int32(p["overflow_blocks"]), cur,
                 self.table, self.overflow, self.node_at_L, self.acts),
            )  # fmt: skip
            self.calls += 1

        def __call__(self):
            self.launch_top()
            self.launch_sub()
            return y_work

        def stats(self):
            c = cp.asnumpy(self.counters[(self.calls - 1) % 2])
            nb = self.plan["nb"]
            return {
                "max_bucket": int(c[:nb].max()),
                "overflow": int(c[nb]),
                "cap": self.plan["cap"],
            }

        def phase_times(self, samples=21):
            t1, t2 = [], []
            for _ in range(samples):
                spin_us(300.0)
                a, b, c = ev(), ev(), ev()
                a.record(stream)
                self.launch_top()
                b.record(stream)
                self.launch_sub()
                c.record(stream)
                c.synchronize()
                t1.append(cp.cuda.get_elapsed_time(a, b) * 1e3)
                t2.append(cp.cuda.get_elapsed_time(b, c) * 1e3)
            return {"phase1_us": float(np.median(t1)), "phase2_us": float(np.median(t2))}

    def grouped_variant(mod_tag, dt, L, chunk, warps, lpr):
        label = f"B grouped L={L} chunk={chunk} w={warps} lpr={lpr} {dt} [{mod_tag}]"
        try:
            g = Grouped(mod_tag, dt, L, chunk, warps, lpr)
        except Exception as exc:
            rec = {"variant": label, "dtype": dt, "error": f"{type(exc).__name__}: {exc}"}
            results["variants"].append(rec)
            print(f"  {label:<44} ERROR {rec['error']}", flush=True)
            return rec
        rec = run_variant(label, dt, g, y=y_work, kernels=[g.top, g.sub], extra={"plan": g.plan})
        if "error" not in rec:
            try:
                rec.update(g.stats())
                rec.update(g.phase_times())
                dump()
            except Exception as exc:
                rec["stats_error"] = str(exc)
        return rec

    # A: fastff as it is
    if layer is not None and not args.skip_fastff:
        try:
            t0 = time.time()
            layer.to("cuda")
            layer(xg)
            stream.synchronize()
            note(f"fastff .to('cuda') + first call (compiles kernels.cu): {time.time() - t0:.1f} s")
            run_variant("A fastff UltraFFF (existing kernel)", "fp32", lambda: layer(xg))
        except Exception as exc:
            results["variants"].append({"variant": "A fastff", "error": repr(exc)})
            traceback.print_exc()

    # P and C, fp32 then bf16 (D); P [d] of each dtype is the all-rows comparison
    for dt in ("fp32", "bf16"):
        tag = "D " if dt == "bf16" else ""
        for mod_tag in ("d", "m1"):
            fn, ks = full_walk(mod_tag, dt, 32, 1)
            run_variant(
                f"{tag}P warp/row {dt} [{mod_tag}]", dt, fn, y_work, ks, keep_as_p=(mod_tag == "d")
            )
        fn, ks = full_walk("m1", dt, 32, 1)
        run_variant(f"{tag}P warp/row {dt} [m1] carveout default", dt, fn, y_work, ks, carveout=-1)
        for mod_tag in ("d", "m1"):
            fn, ks = full_walk(mod_tag, dt, 32, 2)
            run_variant(f"{tag}C 2 rows/warp interleaved {dt} [{mod_tag}]", dt, fn, y_work, ks)
            fn, ks = full_walk(mod_tag, dt, 16, 1)
            run_variant(f"{tag}C half warp/row {dt} [{mod_tag}]", dt, fn, y_work, ks)

    # B fp32: sweep L, chunk, block width, lane count and module
    sweep = [(m, L, 32, 8, 32) for m in ("d", "m1") for L in (4, 5, 6, 7, 8)]
    sweep += [("d", L, c, 8, 32) for L in (6, 7) for c in (16, 64)]
    sweep += [("d", L, 32, 4, 32) for L in (6, 7)]
    sweep += [("d", L, 32, 8, 16) for L in (5, 7)]
    b_recs = [(cfg, grouped_variant(cfg[0], "fp32", *cfg[1:])) for cfg in sweep]
    ranked = sorted((r["med_us"], cfg) for cfg, r in b_recs if r.get("ok") and "med_us" in r)
    # D: bf16 on the three best fp32 groupings (and a fixed one, if not among them)
    best = [cfg for _, cfg in ranked[:3]]
    if ("d", 7, 32, 8, 32) not in best:
        best.append(("d", 7, 32, 8, 32))
    for cfg in best:
        grouped_variant(cfg[0], "bf16", *cfg[1:])

    # cuBLAS dense fp32, and the x -> y copy floor
    try:
        wi, bi, wo = weights["fp32"]
        wi_t = wi.T
        gelu_bias = cp.ElementwiseKernel(
            "float32 z, float32 b",
            "float32 h",
            "float t = z + b; h = 0.5f * t * (1.0f + erff(t * 0.70710678118654752f))",
            "probe_gelu_bias",
        )

        def dense():
            return gelu_bias(xg @ wi_t, bi) @ wo

        run_variant("cuBLAS dense fp32 (TF32 off)", "dense", dense)
    except Exception as exc:
        results["variants"].append({"variant": "cuBLAS dense", "error": repr(exc)})
        traceback.print_exc()
    cp.get_default_memory_pool().free_all_blocks()

    def copy_floor():
        y_work[...] = xg
        return y_work

    run_variant("floor: x -> y copy (HBM)", "copy", copy_floor)

    # -- table -------------------------------------------------------------------------------
    by_name = {r["variant"]: r for r in results["variants"]}
    a_med = by_name.get("A fastff UltraFFF (existing kernel)", {}).get("med_us")
    blas = by_name.get("cuBLAS dense fp32 (TF32 off)", {}).get("med_us")
    hdr = (
        f"{'variant':<46} {'med us':>8} {'min us':>8} {'1call':>8} {'xA':>6} {'xBLAS':>7} "
        f"{'rel err':>9} {'maxrow':>9} {'bad/amb':>7} {'!=P':>5}"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in results["variants"]:
        if "med_us" not in r:
            lines.append(f"{r['variant']:<46} ERROR {r.get('error', '?')[:60]}")
            continue
        med = r["med_us"]
        r["speedup_vs_A"] = a_med / med if a_med else None
        r["speedup_vs_cublas"] = blas / med if blas else None
        xa = f"{r['speedup_vs_A']:.2f}" if a_med else "-"
        xb = f"{r['speedup_vs_cublas']:.1f}" if blas else "-"
        if "rel_err" in r:
            err = f"{r['rel_err']:9.2e} {r['max_row_rel']:9.2e} "
            err += f"{r['bad_rows']:>3}/{r['ambiguous_rows']:<3}"
            err += f" {r.get('rows_differing_from_P', '-'):>5}" + ("" if r["ok"] else "  FAIL")
        else:
            err = ""
        lines.append(
            f"{r['variant']:<46} {med:8.1f} {r['min_us']:8.1f} {r['one_call_us']:8.1f} "
            f"{xa:>6} {xb:>7} {err}"
        )
    for r in results["variants"]:
        if "phase1_us" in r:
            lines.append(
                f"  {r['variant']}: phase1 {r['phase1_us']:.1f} us, phase2 {r['phase2_us']:.1f} us"
                f" (alone, launch gap included); max bucket {r['max_bucket']}/cap {r['cap']}, "
                f"overflow {r['overflow']}"
            )
    results["table"] = lines
    results["wall_s"] = time.time() - t_start
    print("\n" + "\n".join(lines))
    print(
        "\nmed/min: us per call, 10 back-to-back calls (host overhead hidden); 1call: one call "
        "alone; bad/amb: check rows over tolerance / rows with an ambiguous reference path; "
        "!=P: rows of all 8192 not bit-equal to P [d] of the same weight dtype.",
        flush=True,
    )
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
