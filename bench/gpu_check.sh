#!/usr/bin/env bash
# What a lent GPU machine is for, in one go (docs/PERFORMANCE.md, section 7). Needs this checkout's
# requirements importable and wrk on the PATH; writes its logs and results into OUT_DIR.
#     bash bench/gpu_check.sh OUT_DIR [SECONDS_FOR_THE_SERVING_RATIOS]
# 1. the GPU's half-precision vectors against the CPU's, and CUDA-graph replays against the kernel-by-kernel
#    pass (tests/test_embedder.py);
# 2. the embedder's pass kernel by kernel against its CUDA-graph replay, per batch size (bench.cuda_graphs);
# 3. the serving ratios on the GPU with 8 entry and 4 embedder processes, CUDA graphs off then on (the A/B),
#    then 12 entry and 2 embedder processes with graphs, GPU use sampled each second.
set -uo pipefail
out=${1:?give a folder for the results}; budget=${2:-360}
export BENTOML_DO_NOT_TRACK=True PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_embedder.py 2>&1 | tee "$out/test_embedder.log" | tail -4
timeout 120 python3 -m bench.cuda_graphs --out "$out/cuda_graphs_gpu.json" 2>&1 | tee "$out/cuda_graphs.log" |
  cut -c1-220
nvidia-smi dmon -s u -d 1 >"$out/gpu_use.txt" 2>&1 &
timeout "$budget" python3 -m bench.overhead --before '' --upload page --rounds 1 \
  --layout "8x4 IMAGESEARCH_CUDA_GRAPHS=0" --layout 8x4 --layout 12x2 \
  --clients 8 --clients 16 --clients 32 --seconds 8 --bare-seconds 2 --out "$out/overhead_gpu_graphs.json" 2>&1 |
  tee "$out/overhead.log" | grep '"code"' | cut -c1-600
kill %1 2>/dev/null
grep -h "CUDA graphs" /tmp/bench-overhead-*/*.log 2>/dev/null | head -3
true
