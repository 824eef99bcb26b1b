#!/usr/bin/env bash
# What a lent GPU machine is for, in one go (docs/PERFORMANCE.md, section 7). Needs this checkout's
# requirements importable and wrk on the PATH; writes its logs and results into OUT_DIR.
#     bash bench/gpu_check.sh OUT_DIR [SECONDS_FOR_THE_SERVING_RATIOS]
# 1. the GPU's half-precision vectors against the CPU's (tests/test_embedder.py);
# 2. a seconds-long served run on the GPU (bench.overhead --quick): stop here if the service cannot serve;
# 3. the entry's off-loop work on pools of 1-20 threads (bench.entry_threads);
# 4. the serving ratios on the GPU: one entry and one embedder process (the default there), then 8 entry and
#    4 embedder processes sharing the GPU (the spare cores put to work), GPU use sampled each second.
set -uo pipefail
out=${1:?give a folder for the results}; budget=${2:-360}
export BENTOML_DO_NOT_TRACK=True PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_embedder.py 2>&1 | tee "$out/test_embedder.log" | tail -3
timeout 150 python3 -m bench.overhead --quick --before '' --upload page 2>&1 | tail -2 || exit 1
python3 -m bench.entry_threads --rounds 1 --seconds 2 --out "$out/entry_threads_gpu.json" | tail -7
nvidia-smi dmon -s u -d 1 >"$out/gpu_use.txt" 2>&1 &
timeout "$budget" python3 -m bench.overhead --before '' --upload page --rounds 1 --layout 1x1 --layout 8x4 \
  --clients 8 --clients 16 --clients 32 --seconds 10 --bare-seconds 3 --out docs/overhead_gpu_layouts.json 2>&1 |
  tee "$out/overhead.log" | grep '"code"'
kill %1 2>/dev/null
cp docs/overhead_gpu_layouts.json "$out/" 2>/dev/null || echo "no rows finished within $budget s"
