#!/usr/bin/env bash
# One short GPU window, one command: build, check, benchmark, plot, summarize.
#
#   bash benchmarks/gpu_suite.sh            # writes into $OUT, else ./gpu_results
#
# Needs a CUDA machine with PyTorch, Triton and transformers installed; never touches
# the network (pip runs with --no-index). Every step runs under `timeout`, its
# failure is recorded and the suite goes on. The whole suite keeps to SUITE_SECONDS
# (default 430 s, plus 35 s kept for the plot: under 8 minutes): later steps get
# what is left, the plot and the summary always run. SUITE_SMOKE=1 runs the benchmarks in --smoke mode and
# SUITE_NO_BUILD=1 skips the build (a dry run of the plumbing on any machine).
# Output: 6 files, all in one folder:
#   suite.log  every step's output        env.txt           GPU, driver, versions
#   kernels.csv  bench_kernels rows       e2e.csv           bench_e2e rows
#   kernels_speedup.png                   summary.txt       step table + targets (printed last)
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
OUT=${OUT:-./gpu_results}      # relative to where the suite is started
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG=$OUT/suite.log
SUMMARY=$OUT/summary.txt
TOTAL=${SUITE_SECONDS:-430}    # + RESERVE for the plot: at most 465 s, under 8 minutes
RESERVE=35                     # seconds kept for the plot and the summary
SCRATCH=$(mktemp -d)           # temporary checkpoints of bench_e2e, never in $OUT
trap 'rm -rf "$SCRATCH"' EXIT
: > "$LOG"
printf '%-14s %5s %6s  %s\n' step rc secs status > "$SUMMARY"

# step NAME BUDGET_S CMD...: run CMD under timeout (budget capped by what is left),
# log its output, record rc and time. Steps that cannot get 10 s are skipped.
step() {
    local name=$1 budget=$2
    shift 2
    local left=$((TOTAL - SECONDS - RESERVE))
    [ "$name" = plot ] && left=$((TOTAL + RESERVE - SECONDS))
    local t=$budget
    [ "$left" -lt "$t" ] && t=$left
    if [ "$t" -lt 10 ]; then
        printf '%-14s %5s %6s  %s\n' "$name" - 0 "skipped: suite time used up" >> "$SUMMARY"
        echo "=== $name: skipped (suite time used up)" | tee -a "$LOG"
        return 0
    fi
    echo "=== $name (timeout ${t}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    # bash -c so that exported shell functions run under timeout too; timeout signals the whole group
    timeout -k 10 "$t" bash -c '"$@"' _ "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    local status=ok
    [ "$rc" -ne 0 ] && status="FAILED"
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && status="TIMED OUT after ${t}s"
    printf '%-14s %5s %6s  %s\n' "$name" "$rc" $((SECONDS - t0)) "$status" >> "$SUMMARY"
    echo "=== $name: rc=$rc ($status) in $((SECONDS - t0))s" | tee -a "$LOG"
}

# run benchmarks/NAME.py as a module if it exists, else say so and fail the step
maybe() {
    local name=$1
    shift
    if [ -f "benchmarks/$name.py" ]; then "$PY" -m "benchmarks.$name" "$@"
    else echo "benchmarks/$name.py does not exist in this checkout"; return 3; fi
}

env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>&1
    "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "NONE",
      "| cusparselt", getattr(torch.backends, "cusparselt", None) and torch.backends.cusparselt.version())
for m in ("triton", "transformers", "safetensors", "gguf", "pynvml"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "unavailable:", type(e).__name__, e)
EOF
    git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout (${ARMOR_COMMIT:-unknown})"
    "$PY" -m armor_runtime env 2>&1 || echo "armor env failed"
}

# targets first: the Llama-3-8B MLP layers at 1 and 2048 tokens lead every list
K_PROVIDERS=${K_PROVIDERS:-all}
kernels_bf16() {
    if [ -n "${SUITE_SMOKE:-}" ]; then
        "$PY" -m benchmarks.bench_kernels --smoke --out "$OUT/kernels.csv"; return
    fi
    "$PY" -m benchmarks.bench_kernels --out "$OUT/kernels.csv" --dtypes bf16 --tokens 1,2048,16,4096,4,64,256,1024 \
        --rep-ms 40 --providers "$K_PROVIDERS" --exclude armor_reference \
        --shapes llama3-8b:gate,llama3-8b:down,llama3-8b:q_proj,llama3-8b:k_proj,qwen2.5-7b:gate,qwen2.5-14b:down,llama2-7b:gate,smollm2-135m:gate
}
kernels_fp16() {
    if [ -n "${SUITE_SMOKE:-}" ]; then
        "$PY" -m benchmarks.bench_kernels --smoke --dtypes fp16 --out "$OUT/kernels.csv"; return
    fi
    "$PY" -m benchmarks.bench_kernels --out "$OUT/kernels.csv" --dtypes fp16 --tokens 1,16,2048 --rep-ms 40 \
        --providers "$K_PROVIDERS" --exclude armor_reference --shapes llama3-8b:gate,llama3-8b:down
}
# ARMOR right after dense: the comparison the targets need comes before plain 2:4
E2E_ARGS="--variants dense,armor,plain24 --prefill 512,2048 --decode-batches 1,16 --decode-modes cuda_graph,eager
          --prompt 64 --new-tokens 32 --reps 3"
e2e_llama() {
    if [ -n "${SUITE_SMOKE:-}" ]; then
        "$PY" -m benchmarks.bench_e2e --smoke --out "$OUT/e2e.csv" --scratch "$SCRATCH"; return
    fi
    # weights above 4 GiB are not saved to disk: writing 16 GB would eat the window
    "$PY" -m benchmarks.bench_e2e --out "$OUT/e2e.csv" --models llama3-8b-shaped $E2E_ARGS \
        --disk-max-gb 4 --scratch "$SCRATCH"
}
e2e_smol() {
    if [ -n "${SUITE_SMOKE:-}" ]; then
        echo "SUITE_SMOKE: smollm2 step left out"; return
    fi
    "$PY" -m benchmarks.bench_e2e --out "$OUT/e2e.csv" --models smollm2-135m $E2E_ARGS --scratch "$SCRATCH"
}
build() {
    if [ -n "${SUITE_NO_BUILD:-}" ]; then
        echo "SUITE_NO_BUILD is set: not building"; return 0
    fi
    # the CUDA extension; a failure here leaves the pure-Python package and is recorded
    ARMOR_FORCE_CUDA_BUILD=1 "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . \
        || { echo "extension build failed; installing without it"; ARMOR_SKIP_CUDA_BUILD=1 \
             "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . ; return 1; }
}
plot() {
    [ -f "$OUT/kernels.csv" ] || { echo "no kernels.csv: nothing to plot"; return 1; }
    local e2e=()
    [ -f "$OUT/e2e.csv" ] && e2e=(--e2e "$OUT/e2e.csv")
    "$PY" -m benchmarks.plot --kernels "$OUT/kernels.csv" ${e2e[@]+"${e2e[@]}"} --png "$OUT/kernels_speedup.png" \
        --targets --brief | tee "$SCRATCH/targets.txt"
}
export PY OUT SCRATCH K_PROVIDERS E2E_ARGS
export -f maybe env_info build kernels_bf16 kernels_fp16 e2e_llama e2e_smol plot

step env          30 env_info
cp "$LOG" "$OUT/env.txt"
step build       120 build
step check_triton 45 maybe check_triton_gpu --quick
step check_cuda   30 maybe check_cuda_ext
step kernels_bf16 120 kernels_bf16
step e2e_llama   100 e2e_llama
step pytest_gpu   45 "$PY" -m pytest -m gpu -q -p no:cacheprovider
step e2e_smollm   35 e2e_smol
step kernels_fp16 25 kernels_fp16
step plot         30 plot

{
    echo
    echo "GPU suite finished in ${SECONDS}s (budget ${TOTAL}s); files in $OUT"
    if [ -f "$SCRATCH/targets.txt" ]; then
        echo
        cat "$SCRATCH/targets.txt"
    fi
} >> "$SUMMARY"
echo
echo "================ SUMMARY ================"
cat "$SUMMARY"
