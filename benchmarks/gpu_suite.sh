#!/usr/bin/env bash
# The GPU run in one command that fits 6.5 minutes (390 s), most valuable results first.
#
#   ARMOR_COMMIT=<sha> bash benchmarks/gpu_suite.sh [OUT_DIR]   # OUT_DIR, else $OUT, else ./gpu_results
#
# Needs a CUDA machine with PyTorch, Triton, transformers, pybind11 and the cuSPARSELt wheel;
# never touches the network; the package runs from this tree (PYTHONPATH), the extension is
# built in place. ARMOR_COMMIT names the commit when the tree has no .git.
#
# Steps, in order of value, with their budgets in seconds (the `step` lines below; they add
# up to SUITE_SECONDS = 390). A step must end by its deadline, the sum of the budgets up to
# and including its own, so time an early step leaves unused goes to the later ones and the
# suite never runs past 390 s. A step that fails or times out is recorded and the suite goes on.
#   env           15  GPU, clocks, driver, versions, commit, `armor env`        est.  5-10 s
#   build         40  the CUDA extension, in place                               11-13 s measured on 2 CPU cores
#   check_triton  45  every Triton kernel vs the fp64 reference (2 shapes)       est. 15-30 s (JIT compiles)
#   check_cuda    35  extension (cuSPARSELt plan, expand+cuBLAS) and PyTorch's   --budget-s 20 + imports
#                     cuSPARSELt vs the reference; bias, alpha, CUDA graphs
#   kernels      100  Llama-3-8B's 4 layer shapes, bf16, 1 / 16 / 2048 tokens:   est. 50-70 s (~88 timed points
#                     dense, plain 2:4, ARMOR per backend and layout            at 40 ms, searches, compiles)
#   e2e           85  Llama-3-8B-shaped model, 4 layers: decode under CUDA      est. 40-60 s
#                     graphs (batch 1, 16), prefill 2048; dense, ARMOR (one copy
#                     and + cuSPARSELt copy), plain 2:4; weights + resident memory
#   launch        15  per-launch cost under graph replay (empty-kernel chain) and  est. 8-12 s
#                     the decode layer with PDL off/on (replaces the static model's 1 µs assumption)
#   pytest_gpu    30  the GPU-marked tests                                       est. 20-35 s
#   kernels_more  10  more shapes (Qwen2.5, Llama-2, SmolLM2 MLP), while time remains
#   plot          15  speedup PNG and the target table                          est. 3-5 s
# Then the summary table is printed last (also summary.txt).
# Output, all directly in OUT_DIR (7 files): summary.txt, suite.log, env.txt, kernels.csv,
# e2e.csv, launch.csv, speedup.png. SUITE_SMOKE=1: a CPU dry run of the same plumbing in seconds (tiny
# shapes, no build, GPU-only steps skipped), exercised by the tests; its budgets are scaled by
# SUITE_BUDGET_SCALE (default 5 in a dry run, 1 otherwise: a busy CPU imports slower).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
OUT=${1:-${OUT:-./gpu_results}}   # relative to where the suite is started
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PY:-python3}
LOG=$OUT/suite.log
SUMMARY=$OUT/summary.txt
TOTAL=${SUITE_SECONDS:-390}
SMOKE=${SUITE_SMOKE:-}
SCALE=${SUITE_BUDGET_SCALE:-$([ -n "$SMOKE" ] && echo 5 || echo 1)}
TOTAL=$((TOTAL * SCALE))
SCRATCH=$(mktemp -d)              # build objects and temporary files, never in $OUT
trap 'rm -rf "$SCRATCH"' EXIT
: > "$LOG"
printf '%-13s %4s %5s %6s  %s\n' step rc secs budget status > "$SUMMARY"
DEADLINE=0

# step NAME BUDGET CMD...: run CMD under timeout until the step's deadline, log its output,
# record rc and time. A step left with under 5 s is skipped.
step() {
    local name=$1 budget=$2
    shift 2
    DEADLINE=$((DEADLINE + budget * SCALE))
    [ "$DEADLINE" -gt "$TOTAL" ] && DEADLINE=$TOTAL
    local t=$((DEADLINE - SECONDS - 2))   # 2 s for timeout's kill grace
    if [ "$t" -lt 5 ]; then
        printf '%-13s %4s %5s %6s  %s\n' "$name" - 0 "$budget" "skipped: suite time used up" >> "$SUMMARY"
        echo "=== $name: skipped (suite time used up)" | tee -a "$LOG"
        return 0
    fi
    echo "=== $name (timeout ${t}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    # bash -c so that exported shell functions run under timeout too; timeout signals the whole group
    timeout -k 2 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=ok
    [ "$rc" -ne 0 ] && status="FAILED"
    [ "$rc" -eq 2 ] && status="could not run (see log)"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && status="TIMED OUT after ${t}s"
    printf '%-13s %4s %5s %6s  %s\n' "$name" "$rc" $((SECONDS - t0)) "$budget" "$status" >> "$SUMMARY"
    echo "=== $name: rc=$rc ($status) in $((SECONDS - t0))s" | tee -a "$LOG"
}

gpu_only() {  # in a smoke run, say so instead of running a step that needs a GPU
    if [ -n "$SMOKE" ]; then echo "SUITE_SMOKE: needs a GPU, not run"; return 0; fi
    "$@"
}

env_info() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit \
            --format=csv 2>&1
    else
        echo "nvidia-smi: not found"
    fi
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${ARMOR_COMMIT:-unknown} (ARMOR_COMMIT; no .git here)")"
    if command -v nvcc > /dev/null; then nvcc --version | tail -1; else echo "nvcc: not found"; fi
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE",
      "| cusparselt", getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.version())
for m in ("triton", "transformers", "safetensors", "pybind11", "pynvml"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, e)
EOF
    "$PY" -m armor_runtime env 2>&1 || echo "armor env failed"
}
build() {
    if [ -n "$SMOKE" ]; then echo "SUITE_SMOKE: not building"; return 0; fi
    ARMOR_FORCE_CUDA_BUILD=1 "$PY" setup.py -q build_ext --inplace --build-temp "$SCRATCH/build"
}
kernels() {
    if [ -n "$SMOKE" ]; then
        "$PY" -m benchmarks.bench_kernels --smoke --shapes tiny:up --tokens 1 \
            --providers dense,cslt_search,armor_reference --out "$OUT/kernels.csv"; return
    fi
    "$PY" -m benchmarks.bench_kernels --out "$OUT/kernels.csv" --dtypes bf16 --tokens 1,16,2048 --rep-ms 40 \
        --exclude armor_reference --shapes llama3-8b
}
e2e() {
    if [ -n "$SMOKE" ]; then
        "$PY" -m benchmarks.bench_e2e --smoke --variants dense,armor --decode-modes eager,cuda_graph \
            --decode-batches 1 --prefill 8 --new-tokens 2 --no-disk --out "$OUT/e2e.csv"; return
    fi
    "$PY" -m benchmarks.bench_e2e --out "$OUT/e2e.csv" --models llama3-8b-shaped --layers 4 \
        --variants dense,armor,armor_cslt,plain24 --decode-modes cuda_graph --decode-batches 1,16 \
        --prefill 2048 --prompt 64 --new-tokens 32 --reps 3 --no-disk
}
kernels_more() {
    "$PY" -m benchmarks.bench_kernels --out "$OUT/kernels.csv" --dtypes bf16 --tokens 1,2048 --rep-ms 25 \
        --providers dense,cslt_search,armor_auto,armor_auto+cslt \
        --shapes qwen2.5-7b:gate,qwen2.5-14b:down,llama2-7b:gate,smollm2-135m:gate
}
plot() {
    [ -f "$OUT/kernels.csv" ] || { echo "no kernels.csv: nothing to plot"; return 1; }
    local e2e_csv=()
    [ -f "$OUT/e2e.csv" ] && e2e_csv=(--e2e "$OUT/e2e.csv")
    "$PY" -m benchmarks.plot --kernels "$OUT/kernels.csv" ${e2e_csv[@]+"${e2e_csv[@]}"} --png "$OUT/speedup.png" \
        --targets --brief | tee "$SCRATCH/targets.txt"
}
export PY OUT SCRATCH SMOKE
export -f gpu_only env_info build kernels e2e kernels_more plot

step env           15 env_info
cp "$LOG" "$OUT/env.txt"
step build         40 build
step check_triton  45 gpu_only "$PY" -m benchmarks.check_triton_gpu --quick
step check_cuda    35 gpu_only "$PY" -m benchmarks.check_cuda_ext --no-build --budget-s 20
step kernels      100 kernels
step e2e           85 e2e
step launch        15 gpu_only "$PY" -m benchmarks.launch_cost --out "$OUT/launch.csv"
step pytest_gpu    30 gpu_only "$PY" -m pytest -m gpu -q -p no:cacheprovider tests
step kernels_more  10 gpu_only kernels_more
step plot          15 plot

{
    echo
    echo "GPU suite finished in ${SECONDS}s (limit ${TOTAL}s); files in $OUT"
    if [ -f "$SCRATCH/targets.txt" ]; then
        echo
        cat "$SCRATCH/targets.txt"
    fi
} >> "$SUMMARY"
echo
echo "================ SUMMARY ================"
cat "$SUMMARY"
