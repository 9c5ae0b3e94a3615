#!/usr/bin/env bash
# The test suite on this machine (CPU is enough), with python3 where it has everything, else .venv (see env.sh).
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh
# Triton's CPU interpreter runs the Polar Express kernels here; CUDA builds of torch bring triton with them.
ensure_env torch numpy scipy matplotlib tiktoken huggingface_hub pyarrow pytest triton
# The tests' tensors are small: threads gain nothing, and on small VMs idle threads cost ~10x.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PY" -m pytest tests -q "$@"
