#!/usr/bin/env bash
# The prepared GPU check: one run, at most 8 minutes on one GPU, everything written to OUTDIR.
#
#   scripts/gpu_check.sh OUTDIR [--cpu]
#
# Steps, most informative first, so that a timeout still leaves results (OUTDIR/summary.txt has
# one line per step: its exit code and seconds; OUTDIR/<step>.log its output):
#   versions     torch, CUDA, NCCL, driver, CuPy runtime/driver, GPU
#   tests_fast   the quick GPU tests (no host sync in the weightings, the protocol on CUDA)
#   sync_count   profiler count of blocking CUDA calls in backward (tests/kernels/test_gpu_ranks)
#   race         device sleeps and NaN-filled allocations must change no gradient bit
#   solve_time   benchmarks/weighting_solve.py on the GPU: eager vs CUDA-graph replay, S = 1, 8
#   solver_ops   benchmarks/solver_ops.py: kernel launches per bucket solve
#   kernel_bench benchmarks/kernel_bench.py --quick (needs CuPy)
#   nvrtc        NVRTC compile time of the fused kernels: cold, warm from CuPy's disk cache, warm
#   tests_ranks  three gloo ranks on one GPU against the CPU (every weighting, granularities,
#                uneven groups, sketch, FSDP2)
#   step_time    4 gloo processes on one GPU: allreduce_hook vs the hook (shard, sketch)
#   tests_rest   the rest of tests/kernels/test_gpu.py
# --cpu: on a machine without a GPU, run what can run (the GPU tests skip, the benchmarks run
# on the CPU at tiny sizes, the CuPy steps are skipped): the script is known to work before a
# GPU is there. PYTHON selects the interpreter (default: .venv/bin/python, else python3).
set -uo pipefail # no -e: a failed step is recorded and the next one runs

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUTDIR [--cpu]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
CPU=0
[[ ${2:-} == --cpu ]] && CPU=1
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "$PY cannot import torch: set PYTHON to the environment's interpreter" >&2
    exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
BUDGET=${GPU_CHECK_BUDGET_S:-470} # the whole run, leaving margin under 8 minutes
START=$(date +%s)
: >"$OUT/summary.txt"

# step NAME LIMIT_S COMMAND...: run with the smaller of LIMIT_S and the time left.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    ((left < limit)) && limit=$left
    if ((limit < 5)); then
        echo "$name skipped: out of time" | tee -a "$OUT/summary.txt"
        return
    fi
    local begin=$(date +%s)
    echo "== $name (≤ ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(($(date +%s) - begin))s" | tee -a "$OUT/summary.txt"
}

skip() { echo "$1 skipped: $2" | tee -a "$OUT/summary.txt"; }

pytest_step() { # NAME LIMIT_S PYTEST_ARGS...
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m pytest -q -rs -o cache_dir="$OUT/.pytest_cache" \
        --junitxml="$OUT/$name.xml" "$@"
}

step versions 30 "$PY" - <<'EOF'
import importlib.util, platform, shutil, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.cuda.is_available():
    print("GPU", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
else:
    print("no CUDA device")
if shutil.which("nvidia-smi"):
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv"]
    print(subprocess.run(query, capture_output=True, text=True).stdout.strip())
if importlib.util.find_spec("cupy") is None:
    print("CuPy not installed: the kernel steps are skipped")
else:
    import cupy
    print("CuPy", cupy.__version__)
    try:
        runtime, driver = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        print("CuPy CUDA runtime", runtime, "| driver API", driver)
    except Exception as error:
        print("CuPy cannot reach the driver:", error)
EOF
CUDA=0
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null && CUDA=1
CUPY=0
"$PY" -c "import cupy" 2>/dev/null && CUPY=1
if ((CPU == 0 && CUDA == 0)); then
    echo "no CUDA device: run with --cpu to check the script on a CPU machine" | tee -a "$OUT/summary.txt"
    exit 1
fi
DEVICE=cuda
((CPU)) && DEVICE=cpu

pytest_step tests_fast 60 tests/kernels/test_gpu.py \
    -k "do_not_synchronise or protocol_compute or probe_passes or hook_on_nccl"
pytest_step sync_count 60 tests/kernels/test_gpu_ranks.py -k backward_never_waits
pytest_step race 75 tests/kernels/test_gpu_ranks.py -k delays_change_nothing

if ((CPU)); then # the same benchmark code at tiny sizes
    step solve_time 60 "$PY" benchmarks/weighting_solve.py --device cpu --objectives 2,8 \
        --segments 1,8 --repeats 5 --out "$OUT"
else
    step solve_time 60 "$PY" benchmarks/weighting_solve.py --device cuda --graph \
        --objectives 2,4,8,16 --segments 1,8 --repeats 30 --out "$OUT"
fi
step solver_ops 30 "$PY" benchmarks/solver_ops.py --out "$OUT"

if ((CUDA && CUPY)); then
    step kernel_bench 70 "$PY" benchmarks/kernel_bench.py --quick --out "$OUT"
    export CUPY_CACHE_DIR="$OUT/cupy_kernel_cache" # empty: the first compile is cold
    for run in cold warm; do
        step "nvrtc_$run" 30 "$PY" - <<'EOF'
import time, torch
from bucketmoo_hooks._kernels import probe_kernels
start = time.perf_counter()
reason = probe_kernels(0)  # compiles, launches and checks the fused kernels once
first = time.perf_counter() - start
start = time.perf_counter()
probe_kernels(0)
print(f"probe (NVRTC compile + check) {first:.3f} s; again in-process {time.perf_counter() - start:.6f} s; reason {reason}")
EOF
    done
    unset CUPY_CACHE_DIR
else
    skip kernel_bench "needs CUDA and CuPy"
    skip nvrtc "needs CUDA and CuPy"
fi

pytest_step tests_ranks 150 tests/kernels/test_gpu_ranks.py -k "several_ranks or fsdp2"

# 4 processes: gloo on one GPU (--shared-gpu), or on the CPU with --cpu; a small MLP.
STEP_ARGS=(--model mlp --layers 2 --d-model 256 --steps 4 --warmup 2 --rounds 1 --memory-steps 0
    --methods allreduce,mgda,sketch --out "$OUT/step_time.json")
((CPU)) || STEP_ARGS+=(--shared-gpu)
step step_time 90 "$PY" -m torch.distributed.run --standalone --nproc-per-node 4 \
    benchmarks/comm_overhead.py run "${STEP_ARGS[@]}"

pytest_step tests_rest 90 tests/kernels/test_gpu.py \
    -k "not (do_not_synchronise or protocol_compute or probe_passes or hook_on_nccl)"

echo "total $(($(date +%s) - START))s; results in $OUT" | tee -a "$OUT/summary.txt"
