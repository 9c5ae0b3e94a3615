#!/usr/bin/env bash
# Record 43 on one GPU at world size 1 (8 accumulation micro-steps) on synthetic GPT-2-shaped shards, for its first
# STEPS steps (default 120; schedules unchanged). The log's "ready to train" line is the time from start to the first
# timed step; step_avg is ms per step; then peak memory and the final validation loss. Reference on one H100: the
# public record script ran 477.6 ms per step. Extra arguments go to train_gpt.py: --attention=varlen_attn against
# the default measures what flash-attn-4 (requirements-gpu.txt) gains; the log's "kernels:" line says what ran.
#   benchmarks/record43_one_gpu.sh [STEPS] [--flag=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-120}"
shift || true
data="${BENCH_DATA:-/tmp/record43_bench_shards}"
python data/synthetic.py --vocab_size 50257 --train_shards 4 --out "$data"
python train_gpt.py --train_files="$data/train_*.bin" --val_files="$data/val_*.bin" --max_steps="$steps" \
    --log_dir="${LOG_DIR:-logs/bench}" "$@"
