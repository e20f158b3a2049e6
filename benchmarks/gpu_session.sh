#!/usr/bin/env bash
# One device call for the GPU work: build fastff's CPU kernels in place (the GPU image's own
# Python, Cython and compiler; no pip install, whose build would need this repo's pinned
# setuptools), then the GPU tests, the GPU bench, the backward's phases and the issue-24 probe.
# Run from the repository root on the GPU machine; results land in $OUT. Steps are separate, so
# one failure costs only its own results.
#   STEPS="tests bench bench-half phases probe sanitizer" bash benchmarks/gpu_session.sh
set -x
OUT=${OUT:-/tmp/gpu_session_out}
STEPS=${STEPS:-"tests bench bench-half phases probe"}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used,memory.total --format=csv
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"

# fastff/_cmm: cythonize and compile like setup.py does (flags of its BuildExtWithOpenMP)
INCLUDES=$(python3 -c 'import sysconfig, numpy; print("-I" + sysconfig.get_paths()["include"], "-I" + numpy.get_include())')
SUFFIX=$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
python3 -m cython -3 fastff/_cmm.pyx -o /tmp/_cmm.c 2>&1 | tail -3
gcc -O3 -fopenmp-simd -fno-math-errno -fopenmp -shared -fPIC -DFASTFF_HAVE_OPENMP=1 \
    -DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION -Ifastff $INCLUDES /tmp/_cmm.c \
    -o "fastff/_cmm$SUFFIX" 2>&1 | grep -v "warning" | tail -3
python3 -c "import fastff; print('fastff', fastff.__version__, fastff.get_num_threads(), 'threads')"

for step in $STEPS; do
    case $step in
    tests)
        timeout 300 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu.py tests/test_ops.py \
            2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    bench)
        timeout 240 python3 -m fastff bench --device cuda --repeat 20 --json "$OUT/bench_gpu.json" \
            2>&1 | tee "$OUT/bench_gpu.log" ;;
    bench-half)  # the 16-bit kernels, with the float32 layers they were rounded from as a peer
        timeout 120 python3 -m fastff bench --device cuda gpu-ufb gpu-paper-mnist --dtype bfloat16 \
            --repeat 20 --json "$OUT/bench_gpu_bf16.json" 2>&1 | tee "$OUT/bench_gpu_bf16.log" ;;
    phases)
        timeout 60 python3 benchmarks/gpu_phases.py 2>&1 | tee "$OUT/phases.log" | tail -25 ;;
    host)
        timeout 60 python3 benchmarks/gpu_host_profile.py 2>&1 | tee "$OUT/host.log" | head -45 ;;
    probe)
        timeout 150 python3 benchmarks/gpu_probe.py --json "$OUT/probe.json" 2>&1 \
            | tee "$OUT/probe.log" | tail -40 ;;
    sanitizer | memcheck)
        tools="memcheck racecheck"
        [ "$step" = memcheck ] && tools=memcheck
        for tool in $tools; do
            timeout 200 compute-sanitizer --tool $tool python3 -m pytest -q -x -p no:cacheprovider \
                tests/test_gpu.py 2>&1 | tee "$OUT/sanitizer_$tool.log" | tail -4
        done ;;
    esac
done
