#!/usr/bin/env bash
# The GPU check in one command, within 9 minutes on one cold H100 or H200 with no network; without a GPU, a dry run
# of every stage on the CPU. See benchmarks/gpu_check.py for the stages, their time limits and the options:
#   benchmarks/gpu_check.sh [--out DIR] [--stages 1,3] [--steps N] [--limit STAGE=SECONDS ...] [-- train_gpt.py flags]
set -euo pipefail
cd "$(dirname "$0")/.."
. ./env.sh
ensure_env torch numpy
exec "$PY" benchmarks/gpu_check.py "$@"
