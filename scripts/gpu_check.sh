#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one command (a few minutes; about 3 on an H200):
# the CUDA suites on the GPU, the host time of a call, the benchmark at small, medium and
# large sizes, and the launch sizes against an elementwise floor. Uses the Python environment
# it finds (numba, numba-cuda, pytest; torch and CuPy with CUDA for the comparisons and the
# *_on_a_gpu tests); installs nothing.
#   bash scripts/gpu_check.sh [LOG_DIR]        (default: a new folder under /tmp)
# If NumPy is 2.5 or newer, numba-cuda 0.30.4 cannot compile (it names np.row_stack, which
# NumPy 2.5 removed) and numba_bn says so; for a machine you cannot change, this script then
# aliases np.row_stack to np.vstack (what NumPy had) in a sitecustomize of its own, for these
# runs only.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-$(mktemp -d "${TMPDIR:-/tmp}/nbn-gpu.XXXXXX")}
mkdir -p "$logs"
shim=$(mktemp -d "${TMPDIR:-/tmp}/nbn-shim.XXXXXX")
export PYTHONUNBUFFERED=1 NUMBA_CACHE_DIR="$logs/numba-cache"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! python3 -c "import numpy; numpy.row_stack" 2> /dev/null; then
    printf 'import numpy\nnumpy.row_stack = numpy.vstack\n' > "$shim/sitecustomize.py"
    export PYTHONPATH="$PYTHONPATH:$shim"
    echo "NumPy without row_stack: aliased to vstack for these runs (numba-cuda 0.30.4)"
fi
python3 -c "import numba, numba_cuda, numpy; print('numba', numba.__version__, 'numba-cuda', \
numba_cuda.__version__, 'numpy', numpy.__version__)" || exit 1
if ! python3 -c "import numba; from numba import cuda
raise SystemExit(numba.config.ENABLE_CUDASIM or not cuda.is_available())"; then
    echo "no CUDA GPU here (or NUMBA_ENABLE_CUDASIM is set): this script is for a GPU" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$SECONDS
status=0
echo "== the CUDA suites on the GPU -> $logs/tests.log"
NBN_TEST_BACKENDS=cuda python3 -m pytest -q -p no:cacheprovider \
    -W ignore::numba.core.errors.NumbaPerformanceWarning \
    tests/test_conformance.py tests/gpu_suite.py tests/gpu_norms_suite.py \
    tests/test_fused.py::test_fused_train_matches_torch_autograd \
    tests/test_fused.py::test_fused_eval_matches_torch > "$logs/tests.log" 2>&1 || status=1
grep -E "^(FAILED|ERROR)|passed|failed" "$logs/tests.log" | tail -20
echo "== host time of a call ($((SECONDS - start)) s) -> $logs/host_overhead.log"
python3 -W ignore benchmarks/gpu_host_overhead.py > "$logs/host_overhead.log" 2>&1 || status=1
sed -n '1,/cProfile/p' "$logs/host_overhead.log" | grep -v cProfile
echo "== benchmark, small to large ($((SECONDS - start)) s) -> $logs/bench.log"
python3 -W ignore benchmarks/gpu_bench.py --repeat 50 --shape 64,256 --shape 8,16,8,8 \
    --shape 4096,1024 --shape 32,256,56,56 --shape 64,128,64,64 --shape 128,56,56,64:-1 \
    > "$logs/bench.log" 2>&1 || status=1
python3 -W ignore benchmarks/gpu_bench.py --repeat 20 --shape 256,256,56,56 \
    >> "$logs/bench.log" 2>&1 || status=1
grep -v "^  (" "$logs/bench.log"
echo "== launch sizes and the elementwise floor ($((SECONDS - start)) s) -> $logs/sizes.log"
python3 -W ignore benchmarks/gpu_launch_sizes.py --shape 256,256,56,56 --shape 32,256,56,56 \
    --shape 128,56,56,64:-1 --shape 4096,1024 > "$logs/sizes.log" 2>&1 || status=1
cat "$logs/sizes.log"
echo "== done in $((SECONDS - start)) s, status $status; logs in $logs"
rm -rf "$shim"
exit "$status"
