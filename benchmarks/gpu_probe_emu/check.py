"""Run benchmarks/gpu_probe.cu's kernels in the host emulator (emu.cpp) on a few rows and check
them against the float64 reference; B with a tiny capacity exercises the overflow list, and two
calls exercise the ping-pong counter clearing. Slow (threads per lane): ~2 min for 256 rows.

    g++ -std=c++17 -O2 -pthread -o /tmp/gpu_probe_emu benchmarks/gpu_probe_emu/emu.cpp
    python benchmarks/gpu_probe_emu/check.py /tmp/gpu_probe_emu 256
"""

import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gpu_probe as g  # noqa: E402

emu, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 256
D = tempfile.mkdtemp()
x = np.random.default_rng(0).standard_normal((n, g.IN_W)).astype(np.float32)
w_in, b_in, w_out_t, _, _ = g.make_weights()
bi, bo = g.to_bf16_bits(w_in), g.to_bf16_bits(w_out_t)
for name, a in dict(x=x, b=b_in, wi_fp32=w_in, wo_fp32=w_out_t, wi_bf16=bi, wo_bf16=bo).items():
    a.tofile(f"{D}/{name}.bin")
refs = {
    "fp32": g.reference_forward(x, w_in, b_in, w_out_t, g.DEPTH),
    "bf16": g.reference_forward(x, g.from_bf16_bits(bi), b_in, g.from_bf16_bits(bo), g.DEPTH),
}


def run(dt, *a):
    subprocess.run([emu, D, dt, str(n), *map(str, a)], check=True)
    return np.fromfile(f"{D}/y.bin", np.float32).reshape(n, g.OUT_W)


failed = False
for dt in ("fp32", "bf16"):
    P = None
    for lpr, r in ((32, 1), (32, 2), (16, 1)):
        y = run(dt, "full", lpr, r)
        P = y if P is None else P
        c = g.check_rows(y, *refs[dt], g.TOL[dt])
        failed |= not c["ok"]
        print(dt, f"walk_full lpr={lpr} r={r}", c, "bit-equal to P:", np.array_equal(y, P))
    for L, chunk, warps, lpr, tiny_cap in ((5, 32, 8, 32, 0), (7, 16, 4, 16, 0), (4, 32, 8, 32, 8)):
        p = g.bucket_plan(n, L, chunk, warps, lpr)
        if tiny_cap:  # force the overflow list
            p.update(cpb=1, cap=tiny_cap, chunk=tiny_cap, grid2=p["nb"] + p["overflow_blocks"])
        args = [p[k] for k in ("L", "chunk", "warps", "lpr", "cap", "cpb", "overflow_blocks")]
        y = run(dt, "grouped", *args, p["grid2"], 2)
        st = np.fromfile(f"{D}/stats.bin", np.int32)
        c = g.check_rows(y, *refs[dt], g.TOL[dt])
        failed |= not c["ok"] or (lpr == 32 and not np.array_equal(y, P))
        print(dt, f"grouped L={L} chunk={p['chunk']} lpr={lpr} cap={p['cap']}",
              f"max bucket {st[0]} overflow {st[1]}", c["ok"], f"rel {c['rel_err']:.2e}",
              "bit-equal to P:", np.array_equal(y, P))  # fmt: skip
print("FAILED" if failed else "all ok")
sys.exit(int(failed))
