#!/usr/bin/env bash
# One-call GPU check: the kernel and DST test suites on real Triton kernels (bf16 included),
# then the linear and conv benchmarks. Everything lands in $OUT (default ./out).
# Usage (on a GPU machine, from the repo root): bash benchmarks/run_gpu_checks.sh [--quick]
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried to a machine without a registry
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
QUICK=${1:-}
TESTS=$(ls tests/test_linear.py tests/test_layout.py tests/test_conv*.py tests/test_torch_compile.py tests/test_itop_*.py 2>/dev/null | grep -v ddp)
timeout 200 python3 -m pytest -q -p no:cacheprovider $TESTS --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -40 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 benchmarks/bench_linear.py $QUICK --out "$OUT/linear_gpu.json" 2>&1 | grep -v "it/s\]" | tail -60
if [ -f benchmarks/bench_conv.py ]; then
  timeout 120 python3 benchmarks/bench_conv.py $QUICK --out "$OUT/conv_gpu.json" 2>&1 | grep -v "it/s\]" | tail -60
fi
timeout 90 python3 benchmarks/bench_topology_update.py --device cuda --width 4096 --batch 4096 --rounds 4 --out "$OUT/topology_update_gpu.json" 2>&1 | tail -15
ls -la "$OUT"
