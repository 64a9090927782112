#!/usr/bin/env bash
# One call on a GPU machine: the test suite on real Triton kernels (bf16, guard bands, no host
# sync, CUDA-graph capture), then the linear, conv and training-step benchmarks, each under its
# own wall-time budget. Made for a lease of 15 device minutes in all, start-up included, spent
# as two calls back to back (a machine stays warm only 30 s after a call):
#   call 1: ITOP_GIT_COMMIT=<commit> bash benchmarks/run_gpu_checks.sh tests linear conv   (<= 8.5 min)
#   call 2: ITOP_GIT_COMMIT=<commit> bash benchmarks/run_gpu_checks.sh train               (<= 3 min)
# (the copy of the tree on the GPU machine has no .git, so the commit is passed in).
# PART is any of: tests suite linear conv train topology (default: tests linear conv train,
# about 11 min: more than one call's limit). --quick passes --quick to every benchmark.
#
# Results: everything goes to $WORK (default /tmp/itop-gpu); after every part the lot is packed
# into $OUT/results.tar.gz (so a run stopped at its limit still returns what it finished) and
# the log is copied to $OUT/log.txt. $WORK is this script's scratch, already returned by the
# call that wrote it, so the benchmarks get --overwrite: a part rerun on a machine that is
# still warm replaces its own earlier files. The device tool returns at most 8 files from $OUT.
# stk (stanford-stk 0.7.1, pure Python) is read from .stk/ when present (carry it), and wheels
# from .whl/ are installed to /tmp/site.
set -uo pipefail
OUT=${OUT:-out}
WORK=${WORK:-/tmp/itop-gpu}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
LOG="$WORK/log.txt"
: >"$LOG"

QUICK=""
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK="--quick" ;;
    tests|suite|linear|conv|train|topology) PARTS+=("$arg") ;;
    *) echo "unknown argument: $arg (expected --quick or a part: tests suite linear conv train topology)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests linear conv train)

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried to a machine without a registry
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d .stk/stk ] && export PYTHONPATH=$PWD/.stk:${PYTHONPATH:-}
export PYTHONPATH=$PWD:${PYTHONPATH:-}

pack() {  # everything so far into $OUT (overwritten after every part)
  tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null
  cp "$LOG" "$OUT/log.txt"
}

say() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  python3 -c "import stk; print('stk', stk.__file__)" 2>&1 | tail -1
  echo "commit ${ITOP_GIT_COMMIT:-unknown}"
} 2>&1 | tee "$WORK/gpu.txt" | tee -a "$LOG"
pack

run_part() {  # run_part NAME SECONDS CMD...: a hard cap (timeout) around a budgeted script
  local name=$1 cap=$2
  shift 2
  say "$name (cap ${cap} s): $*"
  local t0=$(date +%s)
  # SIGINT at the cap: pytest then still prints its summary (failures so far) and writes its
  # junit XML; the benchmarks have written their JSON after every case anyway.
  timeout -s INT --kill-after=10 "$cap" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$LOG" | tail -40
  local rc=${PIPESTATUS[0]}
  say "$name finished rc=$rc in $(( $(date +%s) - t0 )) s"
  pack
}

for part in "${PARTS[@]}"; do
  case "$part" in
    tests)
      # The kernel and DST-step tests, 8 workers sharing the GPU: bf16 correctness, guard bands,
      # cached vs plain launches, no host sync between updates (sync debug mode), CUDA-graph
      # replay across topology updates. The GPU-only tests run here and nowhere else.
      run_part tests 170 python3 -m pytest -q -p no:cacheprovider -n 8 -rs \
        --junitxml="$WORK/gpu_tests.xml" \
        tests/test_triton_launch.py tests/test_step_syncs.py tests/test_inplace_update.py \
        tests/test_batched_update.py tests/test_batched_grad_scores.py \
        tests/test_sparse_memory.py tests/test_linear.py tests/test_linear_eager.py \
        tests/test_linear_candidates.py tests/test_linear_tma.py tests/test_conv.py \
        tests/test_conv_host.py tests/test_layout.py ;;
    suite)
      # The rest of the suite on the GPU machine (DST, compile, real models, DDP).
      run_part suite 170 python3 -m pytest -q -p no:cacheprovider -n 8 -rs \
        --junitxml="$WORK/gpu_suite.xml" tests \
        --ignore=tests/test_packaging.py --ignore=tests/test_docs_site.py \
        --ignore=tests/test_examples.py --ignore=tests/test_cli.py \
        --ignore=tests/test_triton_launch.py --ignore=tests/test_step_syncs.py --ignore=tests/test_inplace_update.py --ignore=tests/test_batched_update.py --ignore=tests/test_batched_grad_scores.py \
        --ignore=tests/test_sparse_memory.py --ignore=tests/test_linear.py --ignore=tests/test_linear_eager.py \
        --ignore=tests/test_linear_candidates.py --ignore=tests/test_linear_tma.py --ignore=tests/test_conv.py --ignore=tests/test_conv_host.py --ignore=tests/test_layout.py ;;
    linear)
      run_part linear 140 python3 benchmarks/bench_linear.py --sweep $QUICK --budget-s 120 \
        --out "$WORK/linear_gpu.json" --overwrite ;;
    conv)
      run_part conv-host 40 python3 benchmarks/bench_conv.py --host-overhead \
        --out "$WORK/host_overhead_conv_gpu.json" --overwrite
      run_part conv 160 python3 benchmarks/bench_conv.py $QUICK --budget-s 145 \
        --out "$WORK/conv_gpu.json" --overwrite ;;
    train)
      run_part train 170 python3 benchmarks/bench_train_gpu.py $QUICK --budget-s 150 \
        --out-dir "$WORK" --overwrite ;;
    topology)
      run_part topology 60 python3 benchmarks/bench_topology_update.py --device cuda \
        --width 4096 --batch 4096 --rounds 4 --out "$WORK/topology_update_gpu.json" --overwrite ;;
  esac
done
ls -la "$WORK" | tee -a "$LOG"
pack
