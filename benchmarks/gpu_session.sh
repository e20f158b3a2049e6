#!/usr/bin/env bash
# Device command of the issue-24 GPU probe: run from the repository root on the GPU machine;
# results land in $OUT (probe.json, probe.log). The probe itself stays under 150 s.
set -x
OUT=${OUT:-/tmp/gpu_probe_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
# fastff itself is needed only for variant A (the probe runs on without it)
python3 -m pip install -q -e . --no-build-isolation --no-deps 2>&1 | tail -3
PYTHONUNBUFFERED=1 timeout 150 python3 benchmarks/gpu_probe.py --json "$OUT/probe.json" 2>&1 \
    | tee "$OUT/probe.log"
