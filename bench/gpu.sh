#!/usr/bin/env bash
# The benchmarks for a lent GPU, in under 8 minutes; the markdown table goes to a file.
#
#     bash bench/gpu.sh                      # writes bench/gpu_results.md
#     bash bench/gpu.sh /some/where/gpu.md
#
# What it measures (bench/run.py --gpu): DiT-XL/2 at 256x256 (32x32x4 latents)
#   - sampling images/s for each sampler and step count (bench/bench_sample.py, batch 64, cfg 4);
#   - bf16 training images/s, peak memory and MFU with and without gradient checkpointing and
#     torch.compile (bench/gpu_train.py).
# Sampling runs first (about a minute), training second. The whole run is cut at 470 s so it always
# ends in time; the table is rewritten after each benchmark, so a cut run keeps what it measured.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/gpu_results.md}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
timeout --signal=INT --kill-after=15 470 python bench/run.py --gpu --output "$out" || status=$?
if [ "$status" -eq 124 ]; then
    echo "bench/gpu.sh: cut at 470 s; $out holds the benchmarks that finished" >&2
fi
echo "table: $out"
exit "$status"
