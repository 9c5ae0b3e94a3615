#!/usr/bin/env bash
# The test suite on this machine (CPU is enough), after setting up .venv when something is missing.
set -euo pipefail
cd "$(dirname "$0")"
. ./env.sh
ensure_env torch numpy scipy matplotlib tiktoken huggingface_hub pyarrow pytest
# Triton's CPU interpreter runs the Polar Express kernels here; CUDA builds of torch bring triton with them.
has_modules triton || pip install -q triton || fail "could not install triton for the kernel tests"
# The tests' tensors are small: threads gain nothing, and on small VMs idle threads cost ~10x.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest tests -q "$@"
